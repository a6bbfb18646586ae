"""``build`` and the TensorRT backend: everything checkable without a GPU (the order of the
checks, engine compatibility, typing rules, manifests, opening directories), plus GPU tests
that skip cleanly where TensorRT or a GPU is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from dllm_export.cli import main
from dllm_export.device_profiles import all_profiles, load_profile
from dllm_export.errors import DllmExportError
from dllm_export.export.build import (
    RUNTIME_FIELDS,
    BuildOptions,
    artifact_fingerprint,
    build_engine,
    check_fit,
    check_gpu_matches,
    engine_manifest,
)
from dllm_export.export.plan import plan_model
from dllm_export.export.trt_builder import network_typing, timing_cache_path
from dllm_export.runtime.artifact import open_backend, tensorrt_provider_options
from dllm_export.runtime.backends.tensorrt import (
    RunningStack,
    check_engine_compatibility,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY = {"model_type": "llada", "d_model": 64, "n_heads": 4, "n_layers": 2,
        "mlp_hidden_size": 192, "vocab_size": 300}


def write_artifact(directory: Path, config: dict = TINY, precision: str = "fp32",
                   valid: bool = True, seq_len: int = 64) -> Path:
    directory.mkdir(parents=True)
    manifest = {
        "format": "dllm-export", "format_version": 1, "kind": "onnx", "family": "llada",
        "source": {"checkpoint": "/ckpt", "fingerprint": "abc", "config": config},
        "graph": {"file": "model.onnx", "data": "model.onnx.data", "opset": 18},
        "shapes": {"batch": 1, "seq_len": seq_len}, "dtype": "fp32", "precision": precision,
        "vocab_size": config["vocab_size"], "special_tokens": {"mask_id": 0, "eos_id": 1},
        "special_ids": [1], "topk": 8, "outputs": "decode", "shift_logits": False,
        "moe": None, "generation_defaults": {"algorithm": "llada"},
        "inputs": [{"name": "input_ids", "shape": [1, seq_len], "dtype": "int64"},
                   {"name": "attention_mask", "shape": [1, seq_len], "dtype": "int64"}],
        "output_specs": [], "versions": {"torch": "2.13"}, "validation": {"passed": True},
        "quantization": None, "valid": valid,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "model.onnx").write_bytes(b"graph")
    (directory / "model.onnx.data").write_bytes(b"weights" * 100)
    (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)


# --- engine compatibility (what the backend checks before deserialising) ----------------

ENGINE = {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin (nvgpu)",
          "compute_capability": "8.7", "profile": "jetson-orin-nano-8gb",
          "source_artifact": {"path": "/models/llada-int4"}}


def test_matching_engine_is_accepted():
    running = RunningStack("10.3.0.30", "Orin (nvgpu)", "8.7")
    assert check_engine_compatibility(ENGINE, running, Path("/e")) is None


@pytest.mark.parametrize("running, words", [
    (RunningStack("10.7.0.23", "Orin (nvgpu)", "8.7"),
     "TensorRT 10.3.0.30 (this machine has 10.7.0.23)"),
    (RunningStack("10.3.0.30", "NVIDIA H100 80GB HBM3", "9.0"),
     "compute capability 8.7 (this GPU, NVIDIA H100 80GB HBM3, is 9.0)"),
    (RunningStack("10.3.0.30", "Orin Nano (nvgpu)", "8.7"),
     "Orin (nvgpu) (this GPU is Orin Nano (nvgpu))"),
])
def test_mismatched_engine_is_refused_in_one_line(running, words):
    with pytest.raises(DllmExportError) as caught:
        check_engine_compatibility(ENGINE, running, Path("/engines/orin"))
    message = str(caught.value)
    assert message.startswith("/engines/orin: engine was built for ")
    assert words in message and "\n" not in message
    assert ("rebuild it here with dllm-export build /models/llada-int4 --profile "
            "jetson-orin-nano-8gb") in message


def test_version_and_gpu_mismatch_are_both_named():
    with pytest.raises(DllmExportError, match="TensorRT 10.3.0.30 .* and compute capability 8.7"):
        check_engine_compatibility(ENGINE, RunningStack("11.0.0.1", "RTX", "8.9"), Path("/e"))


# --- builder rules ------------------------------------------------------------------------


@pytest.mark.parametrize("precision, dtype, version, library, typed, flag", [
    ("int8", "fp32", "10.8.0.43", "tensorrt", True, None),   # Q/DQ: the graph has the types
    ("fp8", "fp16", "10.8.0.43", "tensorrt", True, None),
    ("fp16", "fp16", "10.8.0.43", "tensorrt", True, None),   # already fp16
    ("fp32", "fp32", "11.2.0.1", "tensorrt", True, None),
    ("fp16", "fp32", "10.8.0.43", "tensorrt", False, "FP16"),  # TensorRT 10 lowers fp32
    ("bf16", "fp32", "10.3.0.30", "tensorrt", False, "BF16"),
])
def test_network_typing(precision, dtype, version, library, typed, flag):
    typing = network_typing(precision, dtype, version, library)
    assert (typing.strongly_typed, typing.precision_flag) == (typed, flag)


@pytest.mark.parametrize("version, library", [("11.0.0.1", "tensorrt"), ("1.2.0", "tensorrt_rtx")])
def test_strongly_typed_only_libraries_need_a_typed_graph(version, library):
    with pytest.raises(DllmExportError, match="strongly typed networks only.*--dtype fp16"):
        network_typing("fp16", "fp32", version, library)


def test_timing_cache_is_kept_per_gpu_and_version(monkeypatch, tmp_path):
    path = timing_cache_path("NVIDIA GeForce RTX 4090", "8.9", "10.8.0.43", root=tmp_path)
    assert path == tmp_path / "nvidia-geforce-rtx-4090-sm89-trt10.8.0.43.cache"
    monkeypatch.setenv("DLLM_EXPORT_CACHE", str(tmp_path / "c"))
    assert timing_cache_path("Orin", "8.7", "10.3").parent == tmp_path / "c" / "timing"


def test_gpu_must_match_the_profile():
    check_gpu_matches(load_profile("h100-sxm"), "9.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(DllmExportError, match="compute capability 9.0, but profile "
                                              "jetson-orin-nano-8gb describes 8.7"):
        check_gpu_matches(load_profile("jetson-orin-nano-8gb"), "9.0", "NVIDIA H100")


def test_engine_manifest_keeps_runtime_fields_and_adds_the_engine(tmp_path):
    artifact = write_artifact(tmp_path / "art")
    source = json.loads((artifact / "manifest.json").read_text())
    gpu = SimpleNamespace(name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                          cuda_runtime="12.8")
    fingerprint = artifact_fingerprint(artifact, source)
    manifest = engine_manifest(source, library="tensorrt", trt_version="10.8.0.43", gpu=gpu,
                               profile=load_profile("h100-sxm"), precision="bf16",
                               source={"path": str(artifact), "fingerprint": fingerprint},
                               build={"seconds": 1.0})
    assert manifest["kind"] == "tensorrt" and manifest["engine"] == "model.engine"
    assert manifest["valid"] is True and manifest["precision"] == "bf16"
    assert (manifest["gpu_name"], manifest["compute_capability"]) == (gpu.name, "9.0")
    assert manifest["tensorrt_version"] == "10.8.0.43" and manifest["cuda_version"] == "12.8"
    assert manifest["profile"] == "h100-sxm" and len(fingerprint) == 64
    assert "graph" not in manifest and "validation" not in manifest
    assert all(manifest[key] == source[key] for key in RUNTIME_FIELDS if key in source)
    running = RunningStack("10.8.0.43", gpu.name, "9.0")
    check_engine_compatibility(manifest, running, tmp_path)  # what build writes, run accepts


def test_fingerprint_changes_with_the_weights(tmp_path):
    artifact = write_artifact(tmp_path / "art")
    manifest = json.loads((artifact / "manifest.json").read_text())
    before = artifact_fingerprint(artifact, manifest)
    (artifact / "model.onnx.data").write_bytes(b"other weights")
    assert artifact_fingerprint(artifact, manifest) != before


# --- build: the order of refusals --------------------------------------------------------


def test_build_without_tensorrt_says_so_in_one_line(tmp_path, no_tensorrt):
    artifact = write_artifact(tmp_path / "art")
    with pytest.raises(DllmExportError) as caught:
        build_engine(artifact, load_profile("h100-sxm"), tmp_path / "engine", BuildOptions())
    message = str(caught.value)
    assert message.startswith("TensorRT is not installed (import tensorrt failed")
    assert "JetPack" in message and "pip install tensorrt-cu12" in message
    assert "\n" not in message and not (tmp_path / "engine").exists()


def test_build_refuses_a_precision_the_device_lacks_before_tensorrt(tmp_path, no_tensorrt):
    artifact = write_artifact(tmp_path / "art", precision="fp8")
    with pytest.raises(DllmExportError, match="fp8 needs compute capability 8.9 or newer, and "
                                              "this device has 8.7"):
        build_engine(artifact, load_profile("jetson-orin-nano-8gb"), tmp_path / "e",
                     BuildOptions())


@pytest.mark.skipif(not (REFERENCE / "llada-8b-instruct").is_dir(), reason="no reference")
def test_build_refuses_a_plan_that_does_not_fit_with_the_numbers(tmp_path, no_tensorrt):
    config = json.loads((REFERENCE / "llada-8b-instruct" / "config.json").read_text())
    artifact = write_artifact(tmp_path / "art", config=config, seq_len=256)
    with pytest.raises(DllmExportError) as caught:
        build_engine(artifact, load_profile("jetson-orin-nano-8gb"), tmp_path / "e",
                     BuildOptions())
    message = str(caught.value)
    assert "does not fit jetson-orin-nano-8gb in fp16: needs 15.67 GiB (weights 14.93" in message
    assert "of 6.40 GiB usable" in message and "int4 fits" in message


@pytest.mark.skipif(not (REFERENCE / "llada-8b-instruct").is_dir(), reason="no reference")
def test_weight_streaming_lets_a_discrete_gpu_keep_weights_on_the_host(tmp_path):
    config = json.loads((REFERENCE / "llada-8b-instruct" / "config.json").read_text())
    artifact = write_artifact(tmp_path / "art", config=config, seq_len=256)
    plan = plan_model(artifact, load_profile("rtx-3090"), precision="fp32")
    assert not plan.fits
    budget = check_fit(plan, weight_streaming=True)["weight_streaming_budget_bytes"]
    memory = plan.chosen
    assert budget == memory.usable_bytes - memory.activation_bytes - memory.workspace_bytes
    orin = plan_model(artifact, load_profile("jetson-agx-orin-64gb"), precision="fp32")
    assert orin.fits  # 30 GiB of weights fit 57.6 GiB usable
    with pytest.raises(DllmExportError, match="does not fit jetson-orin-nano-8gb"):
        check_fit(plan_model(artifact, load_profile("jetson-orin-nano-8gb")), True)


def test_build_refuses_invalid_artifacts_and_cpu_profiles(tmp_path, no_tensorrt):
    invalid = write_artifact(tmp_path / "bad", valid=False)
    with pytest.raises(DllmExportError, match='not marked valid'):
        build_engine(invalid, load_profile("h100-sxm"), tmp_path / "e", BuildOptions())
    good = write_artifact(tmp_path / "good")
    with pytest.raises(DllmExportError, match="runs ONNX Runtime, which needs no engine"):
        build_engine(good, load_profile("cpu"), tmp_path / "e", BuildOptions())
    with pytest.raises(DllmExportError, match="--via 'trt'"):
        build_engine(good, load_profile("h100-sxm"), tmp_path / "e", BuildOptions(via="trt"))
    manifest = json.loads((good / "manifest.json").read_text())
    manifest.update(family="llada2", cache={"attention": "block_causal", "graphs": {}})
    (good / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DllmExportError, match=r"^--no-cache: llada2 attends block-causal, which "
                                              r"only the cached graphs' engines compute"):
        build_engine(good, load_profile("h100-sxm"), tmp_path / "e", BuildOptions(cache=False))
    assert not (tmp_path / "e").exists()


def test_ort_trt_path_needs_the_tensorrt_provider(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    artifact = write_artifact(tmp_path / "art")
    with pytest.raises(DllmExportError, match="has no TensorrtExecutionProvider"):
        build_engine(artifact, load_profile("h100-sxm"), tmp_path / "e",
                     BuildOptions(via="ort-trt"))


def test_cli_build_without_tensorrt_exits_with_one_line(tmp_path, no_tensorrt):
    artifact = write_artifact(tmp_path / "art")
    result = CliRunner().invoke(main, ["build", str(artifact), "--profile", "h100-sxm",
                                       "-o", str(tmp_path / "engine")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error: TensorRT is not installed")


# --- opening directories ------------------------------------------------------------------


def test_open_backend_refuses_missing_and_invalid_manifests(tmp_path):
    with pytest.raises(DllmExportError, match="no manifest.json"):
        open_backend(tmp_path)
    invalid = write_artifact(tmp_path / "bad", valid=False)
    with pytest.raises(DllmExportError, match='not marked valid \\("valid": true\\)'):
        open_backend(invalid)
    odd = write_artifact(tmp_path / "odd")
    manifest = json.loads((odd / "manifest.json").read_text())
    manifest["kind"] = "coreml"
    (odd / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DllmExportError, match="kind 'coreml' is not one this runtime opens"):
        open_backend(odd)


def test_open_backend_dispatches_on_kind(tmp_path, monkeypatch, no_tensorrt):
    from dllm_export.runtime.backends import onnxruntime as ort_backend

    seen = {}

    class FakeOrt:
        def __init__(self, directory, manifest, provider="cpu", threads=None):
            seen.update(directory=directory, provider=provider, threads=threads)

    monkeypatch.setattr(ort_backend, "OrtBackend", FakeOrt)
    artifact = write_artifact(tmp_path / "art")
    backend, manifest = open_backend(artifact, provider="cuda", threads=2)
    assert isinstance(backend, FakeOrt) and manifest["kind"] == "onnx"
    assert seen == {"directory": artifact, "provider": "cuda", "threads": 2}
    engine = write_artifact(tmp_path / "engine")
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest.update(kind="tensorrt", engine="model.engine", **ENGINE)
    (engine / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DllmExportError, match="TensorRT is not installed"):
        open_backend(engine)


def test_tensorrt_provider_options_are_made_absolute(tmp_path):
    manifest = {"execution_provider": {"options": {"trt_engine_cache_path": "ort-trt-cache",
                                                   "trt_fp16_enable": True}}}
    options = tensorrt_provider_options(tmp_path, manifest)
    assert options["trt_engine_cache_path"] == str((tmp_path / "ort-trt-cache").resolve())
    assert options["trt_fp16_enable"] is True


# --- on a GPU with TensorRT ---------------------------------------------------------------


def gpu_profile(tmp_path):
    """A shipped TensorRT profile of this GPU's compute capability, or one made from h100."""
    from dllm_export.runtime.cuda import gpu_info

    try:
        gpu = gpu_info()
    except DllmExportError as err:
        pytest.skip(f"no usable GPU: {err}")
    for profile in all_profiles():
        cc = profile.compute_capability
        matches = cc is not None and f"{cc[0]}.{cc[1]}" == gpu.compute_capability
        if profile.engine_library == "tensorrt" and matches:
            return profile
    text = load_profile("h100-sxm").path.read_text().replace(
        'compute_capability: "9.0"', f'compute_capability: "{gpu.compute_capability}"')
    path = tmp_path / "this-gpu.yaml"
    path.write_text(text)
    return load_profile(path)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])
def test_engine_matches_onnxruntime_on_the_decode_head(tmp_path, request, family):
    pytest.importorskip("tensorrt")
    pytest.importorskip("torch")
    from dllm_export.export.onnx import ExportOptions, export_model

    profile = gpu_profile(tmp_path)
    tiny_dir = request.getfixturevalue("tiny_dir")  # only once a GPU is known to be there
    artifact = tmp_path / "artifact"
    export_model(tiny_dir(family), artifact, ExportOptions(seq_len=64, target="tensorrt"))
    engine_dir = tmp_path / "engine"
    build_engine(artifact, profile, engine_dir, BuildOptions(precision="fp32"))
    trt_backend, manifest = open_backend(engine_dir)
    ort_backend, _ = open_backend(artifact, provider="cpu")
    rng = np.random.default_rng(0)
    vocab = manifest["vocab_size"]
    ids = rng.integers(0, vocab, size=(1, 64), dtype=np.int64)
    mask = np.ones_like(ids)
    try:
        for step in range(3):  # the first step runs directly, the next ones replay the graph
            ids[0, 32 + step:] = manifest["special_tokens"]["mask_id"]
            got, want = trt_backend.predict(ids, mask), ort_backend.predict(ids, mask)
            # fp32 engine (TF32 GEMMs allowed): top-1 agrees on nearly every position
            assert (got.topk_ids[..., 0] == want.topk_ids[..., 0]).mean() >= 0.98
            np.testing.assert_allclose(got.topk_logprobs[..., 0], want.topk_logprobs[..., 0],
                                       atol=5e-2)
    finally:
        trt_backend.close()


# --- the build and the backend against fake tensorrt / cuda-python (no GPU needed) ------


@pytest.fixture
def fakes(monkeypatch):
    """Install the fakes; returns a function (version, parse_ok, capture_ok) -> log."""
    from fake_tensorrt import FakeCudart, make_tensorrt

    from dllm_export.runtime import cuda

    def install(version="10.8.0.43", parse_ok=True, capture_ok=True) -> dict:
        log: dict = {}
        monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(log, version, parse_ok))
        fake_runtime = FakeCudart(log, capture_ok)
        monkeypatch.setattr(cuda, "cudart", lambda: fake_runtime)
        log["cuda"] = fake_runtime
        return log

    return install


def test_build_drives_the_documented_builder_api(tmp_path, fakes):
    log = fakes()
    artifact = write_artifact(tmp_path / "art")
    events = []
    options = BuildOptions(precision="fp16", timing_cache=tmp_path / "t.cache")
    manifest = build_engine(artifact, load_profile("h100-sxm"), tmp_path / "engine", options,
                            report=lambda *event: events.append(event))
    engine = tmp_path / "engine"
    assert (engine / "model.engine").read_bytes() == b"ENGINE"
    assert (engine / "tokenizer.json").is_file()
    assert json.loads((engine / "manifest.json").read_text()) == manifest
    assert manifest["gpu_name"] == "NVIDIA H100 80GB HBM3" and manifest["cuda_version"] == "12.8"
    assert log["parsed"] == str(artifact / "model.onnx")  # a path: external data is found
    assert log["network_flags"] == 0  # fp32 graph lowered to fp16 by the flag (TensorRT 10)
    assert log["built"]["flags"] == ["FP16"] and log["built"]["level"] == 3
    assert log["built"]["shapes"]["input_ids"] == ((1, 64),) * 3  # min = opt = max
    assert log["workspace"] == ("workspace", 8 << 30)
    assert (tmp_path / "t.cache").read_bytes() == b"timings:"
    assert ("start", "Building engine", None, 2) in events
    build = manifest["build"]
    assert build["peak_device_bytes"] == 10 << 30 and build["peak_host_bytes"] > 0
    assert build["engine_bytes"] == 6 and build["precision_flag"] == "FP16"


def test_build_of_a_quantised_artifact_is_strongly_typed(tmp_path, fakes):
    log = fakes()
    artifact = write_artifact(tmp_path / "art", precision="int8")
    options = BuildOptions(weight_streaming=True, refittable=True,
                           timing_cache=tmp_path / "t.cache")
    manifest = build_engine(artifact, load_profile("h100-sxm"), tmp_path / "e", options)
    assert log["network_flags"] == 1 << 5  # STRONGLY_TYPED
    assert log["built"]["flags"] == ["WEIGHT_STREAMING", "REFIT"]
    assert manifest["precision"] == "int8" and manifest["build"]["strongly_typed"]


def test_build_refusals_after_tensorrt_loads(tmp_path, fakes):
    artifact = write_artifact(tmp_path / "art")
    fakes(version="11.0.0.1")
    with pytest.raises(DllmExportError, match="strongly typed networks only"):
        build_engine(artifact, load_profile("h100-sxm"), tmp_path / "e",
                     BuildOptions(precision="fp16", timing_cache=tmp_path / "t"))
    fakes()
    with pytest.raises(DllmExportError, match="weight-streaming needs a strongly typed"):
        build_engine(artifact, load_profile("h100-sxm"), tmp_path / "e",
                     BuildOptions(precision="fp16", weight_streaming=True))
    with pytest.raises(DllmExportError, match="this GPU \\(NVIDIA H100 80GB HBM3\\) has compute "
                                              "capability 9.0, but profile l4 describes 8.9"):
        build_engine(artifact, load_profile("l4"), tmp_path / "e", BuildOptions())
    fakes(parse_ok=False)
    with pytest.raises(DllmExportError, match="ONNX parser failed \\(1 error\\(s\\); first: In "
                                              "node 3 \\(Attention\\)"):
        build_engine(artifact, load_profile("h100-sxm"), tmp_path / "e", BuildOptions())
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("capture_ok", [True, False])
def test_tensorrt_backend_step_loop(tmp_path, fakes, capture_ok):
    log = fakes(capture_ok=capture_ok)
    artifact = write_artifact(tmp_path / "art", seq_len=8)
    build_engine(artifact, load_profile("h100-sxm"), tmp_path / "engine",
                 BuildOptions(precision="fp32", timing_cache=tmp_path / "t"))
    backend, manifest = open_backend(tmp_path / "engine")
    assert (backend.seq_len, backend.batch_size, backend.special_ids) == (8, 1, (1,))
    ids = np.arange(8, dtype=np.int64)[None]
    mask = np.ones_like(ids)
    first = backend.predict(ids, mask)
    np.testing.assert_array_equal(first.topk_ids[..., 0], ids)
    np.testing.assert_array_equal(first.neg_entropy, -mask)
    log["copies"].clear()
    second = backend.predict(ids + 1, mask)  # same mask: only the canvas goes up
    np.testing.assert_array_equal(second.topk_ids[..., 0], ids + 1)
    uploads = [count for kind, count in log["copies"] if kind == 1]
    downloads = [count for kind, count in log["copies"] if kind == 2]
    assert uploads == [8 * 8]  # input_ids only
    assert len(downloads) == 4  # the decode head's four outputs, never logits
    # step 1: a direct launch plus the one the capture records (the fake runs it); step 2
    # replays the graph (the fake replays by launching) or, without a graph, launches again
    assert log["launches"] == 3
    assert log.get("replays") == (1 if capture_ok else None)
    backend.close()
    assert log["cuda"].memory == {}  # every device buffer freed


def test_tensorrt_backend_refuses_an_engine_from_elsewhere(tmp_path, fakes):
    fakes()
    artifact = write_artifact(tmp_path / "art", seq_len=8)
    build_engine(artifact, load_profile("h100-sxm"), tmp_path / "engine",
                 BuildOptions(precision="fp32", timing_cache=tmp_path / "t"))
    fakes(version="10.9.0.34")  # TensorRT upgraded since the build
    with pytest.raises(DllmExportError, match="engine was built for TensorRT 10.8.0.43 \\(this "
                                              "machine has 10.9.0.34\\).*rebuild it here"):
        open_backend(tmp_path / "engine")


def test_cli_build_shows_progress_and_stats(tmp_path, fakes):
    fakes()
    artifact = write_artifact(tmp_path / "art")
    result = CliRunner().invoke(main, [
        "build", str(artifact), "--profile", "h100-sxm", "-o", str(tmp_path / "engine"),
        "--precision", "fp16", "--timing-cache", str(tmp_path / "t.cache")])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "engine") in result.output and "engine_bytes=6" in result.output


def test_ort_trt_build_fills_the_engine_cache(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    seen = {}

    class FakeSession:
        def __init__(self, path, options, providers):
            seen["providers"] = providers
            cache = Path(providers[0][1]["trt_engine_cache_path"])
            cache.mkdir(parents=True, exist_ok=True)
            (cache / "TensorrtExecutionProvider_TRTKernel_graph_x_sm90.engine").write_bytes(b"e")

        def run(self, names, feeds):
            seen["feeds"] = {k: v.shape for k, v in feeds.items()}

        def get_providers(self):
            return ["TensorrtExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    artifact = write_artifact(tmp_path / "art")
    out = tmp_path / "ort-engine"
    manifest = build_engine(artifact, load_profile("h100-sxm"), out,
                            BuildOptions(via="ort-trt", precision="bf16"))
    name, options = seen["providers"][0]
    assert name == "TensorrtExecutionProvider" and options["trt_bf16_enable"] is True
    assert options["trt_max_workspace_size"] == 8 << 30
    assert options["trt_builder_optimization_level"] == 3
    assert seen["feeds"] == {"input_ids": (1, 64), "attention_mask": (1, 64)}
    assert manifest["kind"] == "onnx" and manifest["ort_tensorrt"]["precision"] == "bf16"
    assert list((out / "ort-trt-cache").glob("*.engine"))  # where run --provider tensorrt looks
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()


def test_build_refuses_a_graph_tensorrt_cannot_parse(tmp_path):
    from dllm_export.export.build import check_tensorrt_compatible

    manifest = {"trt_compatibility": {"clean": False, "findings": [
        {"severity": "error", "node": "model.layers.0.mlp/MoE", "op": "com.microsoft::MoE",
         "reason": "custom-domain op: TensorRT needs a plugin for it"}]}}
    with pytest.raises(DllmExportError, match=r"1 node\(s\) TensorRT cannot parse, e.g. "
                                              r"model.layers.0.mlp/MoE .*re-export with --target tensorrt"):
        check_tensorrt_compatible(tmp_path, manifest)
    check_tensorrt_compatible(tmp_path, {"trt_compatibility": {"clean": True, "findings": []}})


def test_tensorrt_backend_keeps_the_cache_on_the_device(tmp_path, fakes, artifact):
    """Engines for every cached graph; cached decoding commits ONNX Runtime's tokens in
    each mode while the cache stays in device buffers: the prefill engine writes
    it in place, commits are device-to-device copies, and only ids, positions, masks and
    the decode head cross to and from the host."""
    from dllm_export import families
    from dllm_export.runtime.backends.onnxruntime import OrtBackend
    from dllm_export.runtime.generate import SamplerConfig, Special, denoise

    source = artifact("llada", target="tensorrt")  # exported before the fakes replace tensorrt
    log = fakes()
    engine = tmp_path / "engine"
    manifest = build_engine(source, load_profile("h100-sxm"), engine,
                            BuildOptions(precision="fp32", timing_cache=tmp_path / "t"))
    assert sorted(p.name for p in engine.glob("*.engine")) == [
        "decode.engine", "model.engine", "prefill.engine", "step.engine", "window.engine"]
    assert manifest["cache"]["graphs"]["step"]["engine"] == "step.engine"
    assert set(manifest["build"]["cached_engine_bytes"]) == {"prefill", "step", "window",
                                                              "decode"}
    backend, _ = open_backend(engine)
    ort = OrtBackend(source, json.loads((source / "manifest.json").read_text()))
    special = Special(**{k: manifest["special_tokens"][k] for k in ("mask_id", "eos_id")},
                      eot_id=manifest["special_tokens"]["eot_id"],
                      pad_id=manifest["special_tokens"]["eos_id"])
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 300, 32)]
    cache_bytes = sum(b.nbytes for b in backend.cache.values())
    for mode in ("none", "dual", "block"):
        config = SamplerConfig(gen_length=16, steps=16, block_length=8, cache=mode,
                               early_exit=False)
        log["copies"], log["copies_2d"] = [], []
        got = denoise(backend, [prompt], config, special, family=families.family("llada"))
        want = denoise(ort, [prompt], config, special, family=families.family("llada"))
        assert got.sequences.tolist() == want.sequences.tolist(), mode
        assert max(count for _, count in log["copies"]) < cache_bytes / 4, mode
        commits = [c for c in log["copies_2d"] if c[0] == 3]
        assert len(commits) == (2 * 2 if mode == "block" else 0)  # 1 commit x 2 layers x k, v
    backend.close()
    assert log["cuda"].memory == {}
