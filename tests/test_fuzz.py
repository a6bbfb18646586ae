"""The reliability invariant, fuzzed: whatever a user puts in a config field or a CLI
option, a command exits 0, or exits 1/2 with one line on stderr and no traceback, and
leaves no partial output behind.

hypothesis draws a config key of the tiny checkpoints (or a new one) and a value of any
JSON type (huge, negative, fractional, text, nested), and sampler options of any numeric
value; ``inspect``, ``plan`` and ``run`` (cheap, so hundreds of cases run in seconds) must
keep the invariant. Shrunk failures print the exact input.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from dllm_export.cli import main

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 3) | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                               max_size=3),
    max_leaves=6,
)
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, scope="module")
def bounded_memory():
    """A runaway allocation becomes a MemoryError (a failed test), not the OOM killer
    taking the whole run: the address space of this process is capped while fuzzing."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def assert_invariant(result, where):
    text = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{where}: raised {type(result.exception).__name__}: {result.exception}\n{text}")
    assert result.exit_code in (0, 1, 2), (where, result.exit_code, text)
    assert "Traceback" not in text, (where, text)
    if result.exit_code == 1:
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, (where, text)


@pytest.fixture(scope="module")
def fuzz_checkpoint(tiny_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(tiny_dir("llada-moe"), directory)
    return directory


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_config_fields(fuzz_checkpoint, data):
    config_path = fuzz_checkpoint / "config.json"
    original = config_path.read_text()
    config = json.loads(original)
    key = data.draw(st.sampled_from(sorted(config)) | st.text(min_size=1, max_size=6))
    config[key] = data.draw(JSON_VALUES)
    config_path.write_text(json.dumps(config))
    try:
        for args in (["inspect", str(fuzz_checkpoint)],
                     ["plan", str(fuzz_checkpoint), "--profile", "cpu"]):
            assert_invariant(CliRunner().invoke(main, args), f"{args[0]} {key}={config[key]!r}")
    finally:
        config_path.write_text(original)


NUMBERS = (st.integers(-2, 3) | st.integers(-(2**40), 2**40)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["", "abc", "1e309", "-0", "nan"]))
OPTIONS = ("--gen-length", "--steps", "--block-length", "--threshold", "--temperature",
           "--top-p", "--top-k", "--seed", "--threads", "--alg-temp", "--cfg-scale")


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_run_options(artifact, data):
    chosen = data.draw(st.lists(st.sampled_from(OPTIONS), min_size=1, max_size=3, unique=True))
    args = ["run", str(artifact("llada")), "--prompt", data.draw(st.text(max_size=12))]
    for flag in chosen:
        args += [flag, str(data.draw(NUMBERS))]
    assert_invariant(CliRunner().invoke(main, args), " ".join(args[3:]))


@pytest.mark.slow
@FUZZ
@given(flag=st.sampled_from(["--seq-len", "--batch", "--topk", "--moe-block", "--block-length",
                             "--window", "--opset"]),
       value=st.integers(-5, 100_000))
def test_export_options_fail_before_writing(fuzz_checkpoint, tmp_path_factory, flag, value):
    """Bad export sizes are refused before anything is written (valid ones are not run:
    they would export)."""
    from dllm_export.errors import DllmExportError
    from dllm_export.export.onnx import ExportOptions

    try:
        ExportOptions(**{flag[2:].replace("-", "_"): value, "cache": True})
    except DllmExportError:
        out = tmp_path_factory.mktemp("never") / "out"
        result = CliRunner().invoke(main, ["export", str(fuzz_checkpoint), "-o", str(out),
                                           "--cache", flag, str(value)])
        assert_invariant(result, f"export {flag} {value}")
        assert result.exit_code == 1 and not out.exists()
        assert not list(out.parent.iterdir())
