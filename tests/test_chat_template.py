"""Chat templates are untrusted code from a checkpoint: they render only in the sandbox.

Every hostile template here reaches for the interpreter (globals, dunder attributes,
filters, mutation); each must be stopped with one ``DllmExportError`` line naming the file,
and the marker file it tries to create must never appear.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from dllm_export.cli import main
from dllm_export.errors import DllmExportError
from dllm_export.runtime.chat_template import compile_template, render_chat_template
from dllm_export.runtime.tokenizer import TextTokenizer


def hostile_templates(marker):
    cmd = f"touch {marker}"
    return {
        "cycler-globals-os": "{% set _ = cycler.__init__.__globals__.os.system('" + cmd + "') %}x",
        "joiner-globals": "{{ joiner.__init__.__globals__.os.popen('" + cmd + "').read() }}",
        "lipsum-globals": "{{ lipsum.__globals__['os'].system('" + cmd + "') }}",
        "mro-subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "attr-filter": "{{ (''|attr('__class__')|attr('__base__')|attr('__subclasses__'))() }}",
        "format-escape": "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}",
        "raise-exception-globals": "{{ raise_exception.__globals__['os'].system('" + cmd + "') }}",
        "namespace-dunder": "{% set ns = namespace(__class__=1) %}{{ ns }}",
        "dict-type": "{{ dict.__class__.__mro__ }}",
        "mutate-messages": "{% set _ = messages.append({'role': 'system'}) %}{{ messages }}",
        "messages-pop": "{{ messages.pop() }}",
        "func-globals": "{{ strftime_now.__globals__['datetime'] }}",
        "self-module": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os }}",
    }


def _hostile_ids():
    return sorted(hostile_templates("/x"))


@pytest.mark.parametrize("name", _hostile_ids())
def test_hostile_template_is_stopped_in_one_line(name, tmp_path):
    marker = tmp_path / "pwned"
    source = hostile_templates(marker)[name]
    with pytest.raises(DllmExportError) as err:
        render_chat_template(source, "ckpt/tokenizer_config.json",
                             messages=[{"role": "user", "content": "hi"}],
                             add_generation_prompt=True, bos_token="", eos_token="")
    message = str(err.value)
    assert message.startswith("ckpt/tokenizer_config.json: chat_template")
    assert "\n" not in message
    assert not marker.exists()


def test_plain_jinja_would_have_run_the_command(tmp_path):
    """The attack is real: without the sandbox the first template creates the marker."""
    import jinja2

    marker = tmp_path / "pwned"
    source = hostile_templates(marker)["cycler-globals-os"]
    jinja2.Environment().from_string(source).render()
    assert marker.exists()


def test_transformers_helpers_render_like_transformers():
    """raise_exception, tojson (no HTML escaping), namespace, loop controls, generation tag:
    our output equals transformers' own renderer on the same template."""
    from transformers.utils.chat_template_utils import render_jinja_template

    source = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}<{{ m.role }}>{{ m.content | tojson }}"
        "{% generation %}{{ m.content | upper }}{% endgeneration %}{% endfor %}"
        "{{ ns.n }}{{ dict(a=1) | tojson }}{% if add_generation_prompt %}<gen>{% endif %}"
    )
    messages = [{"role": "user", "content": "a <b> & \"c\""},
                {"role": "assistant", "content": "é"}, {"role": "user", "content": "z"}]
    ours = render_chat_template(source, "t", messages=messages, add_generation_prompt=True)
    theirs, _ = render_jinja_template(conversations=[messages], chat_template=source,
                                      add_generation_prompt=True)
    assert ours == theirs[0]


def test_raise_exception_and_syntax_error_are_one_line():
    with pytest.raises(DllmExportError, match=r"^f\.json: chat_template refused the messages: "
                                              r"only user turns$"):
        render_chat_template("{{ raise_exception('only user turns') }}", "f.json")
    with pytest.raises(DllmExportError, match=r"^f\.json: chat_template does not parse \(line 1"):
        render_chat_template("{% for m in messages %}", "f.json", messages=[])


def test_template_is_compiled_once():
    compile_template.cache_clear()
    for _ in range(3):
        render_chat_template("{{ messages | length }}", "t", messages=[])
    assert compile_template.cache_info().misses == 1


def _with_template(tiny_dir, tmp_path, template):
    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("llada"), directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return directory


def test_named_templates_take_the_default(tiny_dir, tmp_path):
    directory = _with_template(tiny_dir, tmp_path, [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages[0].content }}!"}])
    assert TextTokenizer(directory).apply_chat_template([{"role": "user", "content": "Hi"}]) == "Hi!"


@pytest.mark.parametrize("verb", ["generate", "export"])
def test_cli_refuses_hostile_checkpoint_template(verb, tiny_dir, tmp_path):
    marker = tmp_path / "pwned"
    directory = _with_template(tiny_dir, tmp_path, hostile_templates(marker)["cycler-globals-os"])
    args = {
        "generate": ["generate", str(directory), "--prompt", "Hi", "--chat", "--gen-length", "8",
                     "--steps", "8", "--block-length", "8"],
        "export": ["export", str(directory), "-o", str(tmp_path / "art"), "--seq-len", "32"],
    }[verb]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "tokenizer_config.json: chat_template" in lines[0], result.output
    assert "Traceback" not in result.output
    assert not marker.exists()
    assert not (tmp_path / "art").exists()
