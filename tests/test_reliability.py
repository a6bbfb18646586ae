"""Reliability: nothing a user owns is destroyed, nothing half-written is left behind.

Each test is a class of fault from the reliability issue; each failed on the code before it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from dllm_export.cli import main
from dllm_export.errors import DllmExportError
from dllm_export.jsonio import MARKER, atomic_directory, check_output


def _copy_checkpoint(tiny_dir, tmp_path, name="ckpt"):
    import shutil

    target = tmp_path / name
    shutil.copytree(tiny_dir("llada"), target)
    return target


def _one_line(result, *words):
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_overwrite_never_destroys_the_input(where, tiny_dir, tmp_path):
    checkpoint = _copy_checkpoint(tiny_dir, tmp_path)
    before = sorted(p.name for p in checkpoint.iterdir())
    out = {"same": checkpoint, "inside": checkpoint / "onnx", "parent": tmp_path}[where]
    relation = {"same": "is", "inside": "lies inside", "parent": "contains"}[where]
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out),
                                       "--seq-len", "32", "--overwrite"])
    _one_line(result, f"the output {relation} the input")
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_overwrite_replaces_only_our_own_directories(tmp_path):
    theirs = tmp_path / "photos"
    theirs.mkdir()
    (theirs / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(DllmExportError, match="was not written by dllm-export"):
        check_output(theirs, overwrite=True)
    assert (theirs / "holiday.jpg").read_bytes() == b"jpeg"
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(DllmExportError, match="exists and is not a directory"):
        check_output(file, overwrite=True)
    ours = tmp_path / "ours"
    with atomic_directory(ours) as tmp:
        (tmp / "a").write_text("1")
    assert json.loads((ours / MARKER).read_text())["state"] == "complete"
    with atomic_directory(ours, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in ours.iterdir()) == [MARKER, "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "ours", "photos"]


def test_files_written_private_become_readable_like_any_new_file(tmp_path):
    """onnx saves external weights 0600: an artifact served by another user (Triton, a
    system service) could not read its own weights. The artifact's files get the umask's
    permissions; a file deliberately shared wider keeps its mode."""
    import os

    mask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "artifact") as tmp:
            (tmp / "model.onnx.data").write_bytes(b"\0" * 8)
            os.chmod(tmp / "model.onnx.data", 0o600)
            (tmp / "run.sh").write_text("true")
            os.chmod(tmp / "run.sh", 0o755)
    finally:
        os.umask(mask)
    assert (tmp_path / "artifact" / "model.onnx.data").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "artifact" / "run.sh").stat().st_mode & 0o777 == 0o755


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_runs_leftovers_are_cleaned_by_the_next_run(tmp_path):
    out = tmp_path / "artifact"
    stale = tmp_path / ".artifact.partial-x1y2"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"\0" * 1000)
    (stale / MARKER).write_text(json.dumps({"written_by": "dllm-export", "pid": _dead_pid()}))
    old = tmp_path / ".artifact.old-12345"
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"written_by": "dllm-export", "pid": _dead_pid()}))
    foreign = tmp_path / ".artifact.partial-notours"
    foreign.mkdir()  # no marker: not ours, never touched
    alive = tmp_path / ".artifact.partial-running"
    alive.mkdir()
    (alive / MARKER).write_text(json.dumps({"written_by": "dllm-export", "pid": os.getpid()}))
    with atomic_directory(out) as tmp:
        (tmp / "x").write_text("1")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".artifact.partial-notours", ".artifact.partial-running", "artifact"]


def test_sigterm_during_export_leaves_nothing(tiny_dir, tmp_path):
    checkpoint = _copy_checkpoint(tiny_dir, tmp_path)
    out = tmp_path / "art"
    child = subprocess.Popen(
        [sys.executable, "-m", "dllm_export.cli", "export", str(checkpoint), "-o", str(out),
         "--seq-len", "32", "--cache"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".art.partial-*")) and time.time() < deadline:
        if child.poll() is not None:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err.decode()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------- artifacts are verified


@pytest.fixture(scope="module")
def twin_artifacts(tiny_dir, tmp_path_factory):
    """Two canvas-only artifacts of the same shapes from different random weights."""
    from dllm_export.export.onnx import ExportOptions, export_model
    from dllm_export.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("twins")
    made = []
    for seed in (1, 2):
        checkpoint = make_tiny("llada", root / f"ckpt{seed}", seed=seed)
        out = root / f"art{seed}"
        export_model(checkpoint, out, ExportOptions(seq_len=32, validate=False))
        made.append(out)
    return made


def _edited(source, tmp_path, edit):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(source, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


RUN = ["--prompt", "Hi", "--gen-length", "8", "--steps", "8", "--block-length", "8"]


def test_a_swapped_weights_file_is_refused_naming_it(twin_artifacts, tmp_path):
    import shutil

    first, second = twin_artifacts
    swapped = _edited(first, tmp_path, lambda m, d: shutil.copy2(
        second / "model.onnx.data", d / "model.onnx.data"))
    result = CliRunner().invoke(main, ["run", str(swapped), *RUN])
    _one_line(result, "model.onnx.data: differs from the file this directory was written with")
    assert CliRunner().invoke(main, ["run", str(first), *RUN]).exit_code == 0


@pytest.mark.parametrize("field,edit,words", [
    ("seq_len", lambda m, d: m["shapes"].update(seq_len=64),
     "graph input input_ids is [1, 32] but manifest.json (shapes) says [1, 64]"),
    ("batch", lambda m, d: m["shapes"].update(batch=2), "(shapes) says [2, 32]"),
    ("topk", lambda m, d: m.update(topk=4), "output topk_ids is [8] but manifest.json (topk)"),
    ("mask_id", lambda m, d: m["special_tokens"].update(mask_id=10**6),
     "field special_tokens.mask_id = 1000000 must be an integer of at least 0 below"),
    ("vocab_size", lambda m, d: m.update(vocab_size="many"), "field vocab_size = 'many'"),
    ("family", lambda m, d: m.update(family="gpt"), "field family = 'gpt' is not one of"),
    ("shapes", lambda m, d: m.pop("shapes"), "field shapes is missing"),
    ("defaults", lambda m, d: m["generation_defaults"].update(speed=3),
     "field generation_defaults is malformed"),
])
def test_a_hand_edited_manifest_is_refused_in_one_line(field, edit, words, twin_artifacts,
                                                      tmp_path):
    edited = _edited(twin_artifacts[0], tmp_path, edit)
    _one_line(CliRunner().invoke(main, ["run", str(edited), *RUN]), words)


def test_validate_checks_every_byte(tmp_path):
    from dllm_export.integrity import record_files, verify_files

    (tmp_path / "big.bin").write_bytes(bytes(3 << 20))
    manifest = {"files": record_files(tmp_path)}
    with open(tmp_path / "big.bin", "r+b") as handle:  # a byte in the middle MiB
        handle.seek(3 << 19)
        handle.write(b"\1")
    verify_files(tmp_path, manifest)  # the fast check reads the first and last MiB only
    with pytest.raises(DllmExportError, match="big.bin: differs"):
        verify_files(tmp_path, manifest, full=True)
    (tmp_path / "big.bin").unlink()
    with pytest.raises(DllmExportError, match="big.bin: missing"):
        verify_files(tmp_path, manifest)


# ---------------------------------------------------------------- wrong results, tracebacks


def test_integer_weights_are_refused_naming_the_tensor(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    checkpoint = _copy_checkpoint(tiny_dir, tmp_path)
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, str(shard))
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(tmp_path / "a"),
                                       "--seq-len", "32"])
    _one_line(result, f"tensor '{name}' is int8", "floating-point weights")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("chat", [False, True])
def test_user_text_never_becomes_the_mask_token(chat, tiny_dir):
    from dllm_export.runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tiny_dir("llada"))
    mask = tokenizer.token_to_id("<|mdm_mask|>")
    eot = tokenizer.token_to_id("<|eot_id|>")
    ids = tokenizer.format_prompt("fill <|mdm_mask|> and <|eot_id|> in", chat=chat)
    assert mask not in ids and (eot in ids) is chat  # the template's own end of turn only
    assert tokenizer.decode(ids, skip_special_tokens=True).count("<|mdm_mask|>") == 1
    plain = tokenizer.format_prompt("fill and in", chat=chat)
    assert (eot in plain) is chat


@pytest.mark.parametrize("flag,value,words", [
    ("--top-k", "0", "--top-k 0: must be >= 1"),
    ("--threshold", "0", "--threshold 0.0: must be > 0 and <= 1"),
    ("--threshold", "1.5", "--threshold 1.5: must be > 0 and <= 1"),
    ("--temperature", "-1", "--temperature -1.0: must be >= 0"),
    ("--top-p", "0", "--top-p 0.0: must be > 0 and <= 1"),
    ("--seed", "-1", "--seed -1: must be >= 0"),
    ("--threads", "0", "--threads 0: must be an integer from 1 to 1024"),
    ("--steps", str(2**40), "--steps 1099511627776: must be >= 1 and <= 1048576"),
    ("--steps", "0", "--steps 0: must be >= 1"),
])
def test_sampler_options_are_range_checked(flag, value, words, twin_artifacts):
    result = CliRunner().invoke(main, ["run", str(twin_artifacts[0]), *RUN, flag, value])
    _one_line(result, words)


@pytest.mark.parametrize("args,words", [
    (["export", "CKPT", "-o", "OUT", "--moe-block", "0"], "--moe-block 0: must be an integer from 1 to"),
    (["export", "CKPT", "-o", "OUT", "--topk", "100000"], "--topk 100000: exceeds the vocabulary"),
    (["plan", "CKPT", "--profile", "cpu", "--seq-len", "0"], "--seq-len 0: must be an integer from 2 to"),
    (["plan", "CKPT", "--profile", "cpu", "--batch", "0"], "--batch 0: must be an integer from 1 to"),
])
def test_cli_numbers_are_range_checked(args, words, tiny_dir, tmp_path):
    args = [str(tiny_dir("llada")) if a == "CKPT" else str(tmp_path / "o") if a == "OUT" else a
            for a in args]
    _one_line(CliRunner().invoke(main, args), words)


@pytest.mark.parametrize("key,value,words", [
    ("d_model", "64", "field 'd_model' = '64' must be an integer"),
    ("rope_theta", "big", "field 'rope_theta' = 'big' must be a number"),
    ("weight_tying", "no", "field 'weight_tying' = 'no' must be true or false"),
    ("mask_token_id", 10**7, "has no token for the mask id 10000000"),
])
@pytest.mark.parametrize("verb", ["inspect", "export", "plan"])
def test_bad_config_values_are_one_line(key, value, words, verb, tiny_dir, tmp_path):
    checkpoint = _copy_checkpoint(tiny_dir, tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    config[key] = value
    (checkpoint / "config.json").write_text(json.dumps(config))
    args = {"inspect": ["inspect", str(checkpoint)],
            "export": ["export", str(checkpoint), "-o", str(tmp_path / "a"), "--seq-len", "32"],
            "plan": ["plan", str(checkpoint), "--profile", "cpu"]}[verb]
    result = CliRunner().invoke(main, args)
    if verb == "plan" and key == "mask_token_id":
        assert result.exit_code == 0, result.output  # plan reads no tokenizer
        return
    _one_line(result, words)


def test_a_tokenizer_without_the_mask_token_is_refused(tiny_dir, tmp_path):
    checkpoint = _copy_checkpoint(tiny_dir, tmp_path)
    path = checkpoint / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"]
                                 if t["content"] != "<|mdm_mask|>"]
    path.write_text(json.dumps(tokenizer))
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(tmp_path / "a"),
                                       "--seq-len", "32"])
    _one_line(result, "tokenizer.json: has no token for the mask id")


def test_check_trt_on_a_file_that_is_not_onnx(tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x00garbage\xff" * 10)
    _one_line(CliRunner().invoke(main, ["check-trt", str(bogus)]), "not an ONNX model")


def test_invalid_utf8_prompt_from_the_shell(twin_artifacts):
    result = subprocess.run(
        [sys.executable, "-m", "dllm_export.cli", "run", str(twin_artifacts[0]), "--prompt",
         b"caf\xe9 \xff", "--gen-length", "8", "--steps", "8", "--block-length", "8"],
        capture_output=True)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "prompt: not valid UTF-8" in err


def test_two_generators_in_two_threads_match_sequential_runs(artifact):
    import threading

    from dllm_export.runtime import Generator

    prompts = ["one two", "three four five", "six", "seven eight nine ten"]
    options = dict(gen_length=16, steps=16, block_length=8)
    for cache in ("none", "dual"):
        sequential = [Generator.from_artifact(artifact("llada")).generate(
            p, cache=cache, **options).tokens for p in prompts]
        generators = [Generator.from_artifact(artifact("llada")) for _ in range(2)]
        results = [[None] * len(prompts) for _ in generators]

        def work(slot, generator, cache=cache, results=results):
            for index, prompt in enumerate(prompts):
                results[slot][index] = generator.generate(prompt, cache=cache, **options).tokens

        workers = [threading.Thread(target=work, args=(i, g)) for i, g in enumerate(generators)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert results == [sequential, sequential], cache


@pytest.mark.parametrize("line,words", [
    ('{"messages": ["hi"]}', "line 1: every message needs a text 'role' and 'content'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "every message needs a text"),
    ("[1, 2]", "line 1 must be a JSON object"),
    ('{"prompt": 3}', "line 1 has none of the keys messages, prompt or text"),
    ("{not json", "line 1 is not JSON"),
])
def test_bad_calibration_lines_are_one_line(line, words, tmp_path):
    from dllm_export.calibration.sources import open_source

    path = tmp_path / "calib.jsonl"
    path.write_text(line + "\n")
    _, items = open_source(path, "generic")
    with pytest.raises(DllmExportError, match=words.replace("(", r"\(").replace(")", r"\)")):
        list(items)
