"""Chat templates from a checkpoint, rendered in Jinja's immutable sandbox.

A ``chat_template`` is text from a downloaded checkpoint, so it is untrusted code: it is
compiled in ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with the helpers transformers
gives templates (``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape
HTML, a ``dict`` and a ``namespace`` that cannot reach CPython internals, the
``{% generation %}`` tag, loop controls), as ``transformers.utils.chat_template_utils``
does. Any template that fails to parse, raises, or reaches for what the sandbox forbids
becomes one ``DllmExportError`` line naming the file it came from.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from dllm_export.errors import DllmExportError

# jinja2 before 3.1.6 has known sandbox escapes (CVE-2024-56326, CVE-2025-27516).
MIN_JINJA = (3, 1, 6)


class TemplateRaised(Exception):
    """``raise_exception(...)`` called by the template itself."""


def _jinja():
    import jinja2

    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_JINJA:
        raise DllmExportError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes; "
            "upgrade it: pip install 'jinja2>=3.1.6'"
        )
    return jinja2


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached per source text: a template is compiled once)."""
    jinja2 = _jinja()
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # transformers' `{% generation %}` marks assistant text; rendering keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(
                self.call_method("_render"), [], [], body
            ).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateRaised(str(message))

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
            sort_keys=sort_keys,
        )

    class TemplateDict:
        # A callable stand-in for `dict` that exposes no type to climb from.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Namespaces refuse underscore names, which would otherwise shadow internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"namespace attribute {name!r} starts with an underscore"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


def render_chat_template(source: str, origin: str, **context) -> str:
    """Render ``source`` (from the file ``origin``) with ``context``; one line on failure."""
    jinja2 = _jinja()
    try:
        template = compile_template(source)
    except jinja2.TemplateSyntaxError as err:
        raise DllmExportError(
            f"{origin}: chat_template does not parse (line {err.lineno}: {err.message}); "
            "fix the template or drop --chat"
        ) from None
    try:
        return template.render(**context)
    except TemplateRaised as err:
        raise DllmExportError(f"{origin}: chat_template refused the messages: {err}") from None
    except jinja2.exceptions.SecurityError as err:
        raise DllmExportError(
            f"{origin}: chat_template tried an unsafe operation and was stopped ({err}); "
            "do not use this checkpoint's template"
        ) from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError,
            IndexError, ZeroDivisionError, OverflowError, RecursionError) as err:
        raise DllmExportError(
            f"{origin}: chat_template failed to render ({type(err).__name__}: {err})"
        ) from None


def check_chat_template(source: str, origin: str) -> None:
    """Refuse a template that does not parse or cannot render one user turn."""
    render_chat_template(
        source, origin, messages=[{"role": "user", "content": "Hello"}],
        add_generation_prompt=True, bos_token="", eos_token="",
    )
