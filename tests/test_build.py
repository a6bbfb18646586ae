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
from fake_tensorrt import TRT10, TRT11
from trt_fixtures import (
    VERSION_IDS,
    VERSIONS,
    install_stand_ins,
    versioned,
    write_artifact,
)

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
from dllm_export.export.trt_builder import (
    check_supported,
    network_typing,
    timing_cache_path,
)
from dllm_export.runtime.artifact import open_backend
from dllm_export.runtime.backends.tensorrt import (
    RunningStack,
    check_engine_compatibility,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture
def install_fakes(monkeypatch):
    return install_stand_ins(monkeypatch)


@pytest.fixture(params=VERSIONS, ids=VERSION_IDS)
def trt_version(request):
    return request.param


@pytest.fixture
def fakes(install_fakes, trt_version):
    """The stand-ins of TensorRT 10.x, and again of 11.x."""
    return versioned(install_fakes, trt_version)


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


@pytest.mark.parametrize("precision, dtype, version, library, typed, flag, cast, bit", [
    ("int8", "fp32", "10.8.0.43", "tensorrt", True, None, None, True),  # Q/DQ: typed graph
    ("fp8", "fp16", "10.8.0.43", "tensorrt", True, None, None, True),
    ("fp16", "fp16", "10.8.0.43", "tensorrt", True, None, None, True),   # already fp16
    ("fp32", "fp32", "11.2.0.1", "tensorrt", True, None, None, False),
    ("fp16", "fp32", "10.8.0.43", "tensorrt", False, "FP16", None, False),  # 10 lowers fp32
    ("bf16", "fp32", "10.3.0.30", "tensorrt", False, "BF16", None, False),
    ("bf16", "fp32", TRT11, "tensorrt", True, None, "bf16", False),  # 11: cast the graph
    ("fp16", "fp32", "1.2.0", "tensorrt_rtx", True, None, "fp16", False),
    ("int8", "fp32", TRT11, "tensorrt", True, None, None, False),  # 11: flag deprecated
])
def test_network_typing(precision, dtype, version, library, typed, flag, cast, bit):
    typing = network_typing(precision, dtype, version, library)
    assert (typing.strongly_typed, typing.precision_flag, typing.cast_to,
            typing.creation_flag) == (typed, flag, cast, bit)


@pytest.mark.parametrize("version, library", [(TRT11, "tensorrt"), ("1.2.0", "tensorrt_rtx")])
def test_strongly_typed_libraries_do_not_recast_a_16_bit_graph(version, library):
    with pytest.raises(DllmExportError, match="this artifact is fp16 .* builds the types the "
                                              "graph carries: export it again with --dtype bf16"):
        network_typing("bf16", "fp16", version, library)


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0.30", "12.0.0"])
def test_unsupported_tensorrt_is_refused(version):
    with pytest.raises(DllmExportError, match=f"TensorRT {version} is outside the supported "
                                              "10.8 to 11.x"):
        check_supported(version, "tensorrt")
    check_supported("1.2.0", "tensorrt_rtx")  # TensorRT for RTX has its own numbering


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
        def __init__(self, directory, manifest, provider="cpu", threads=None, memory="fast"):
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


# --- the build and the backend against the stand-ins (no GPU needed) ---------------------


def test_build_drives_the_documented_builder_api(tmp_path, fakes, trt_version):
    log = fakes()
    # TensorRT 10 lowers an fp32 graph with the FP16 flag; 11 has no flag: an fp16 graph
    ten = trt_version == TRT10
    artifact = write_artifact(tmp_path / "art", dtype="fp32" if ten else "fp16")
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
    assert log["network_flags"] == 0  # 10: weakly typed; 11: typed, flag deprecated
    assert log["built"]["flags"] == (["FP16"] if ten else [])
    assert log["built"]["level"] == 3
    assert log["built"]["shapes"]["input_ids"] == ((1, 64),) * 3  # min = opt = max
    assert log["workspace"] == ("workspace", 8 << 30)
    assert (tmp_path / "t.cache").read_bytes() == b"timings:"
    assert ("start", "Building engine", None, 2) in events
    build = manifest["build"]
    assert build["peak_device_bytes"] == 10 << 30 and build["peak_host_bytes"] > 0
    assert build["engine_bytes"] == 6 and build["precision_flag"] == ("FP16" if ten else None)
    assert build["precision_from"] == ("builder flag FP16 on the fp32 graph" if ten
                                       else "graph (fp16 artifact built as fp16)")
    assert build["cast_pass"] is None


def test_build_of_a_quantised_artifact_is_strongly_typed(tmp_path, fakes, trt_version):
    log = fakes()
    artifact = write_artifact(tmp_path / "art", precision="int8")
    options = BuildOptions(weight_streaming=True, refittable=True,
                           timing_cache=tmp_path / "t.cache")
    manifest = build_engine(artifact, load_profile("h100-sxm"), tmp_path / "e", options)
    # NetworkDefinitionCreationFlag.STRONGLY_TYPED is 1 in 10.x; in 11.x (0) it is ignored
    assert log["network_flags"] == (1 << 1 if trt_version == TRT10 else 0)
    assert log["built"]["flags"] == ["WEIGHT_STREAMING", "REFIT"]
    assert manifest["precision"] == "int8" and manifest["build"]["strongly_typed"]


def test_build_refusals_after_tensorrt_loads(tmp_path, fakes, trt_version):
    artifact = write_artifact(tmp_path / "art")
    fakes()
    if trt_version == TRT10:
        with pytest.raises(DllmExportError, match="weight-streaming needs a strongly typed"):
            build_engine(artifact, load_profile("h100-sxm"), tmp_path / "e",
                         BuildOptions(precision="fp16", weight_streaming=True))
    else:  # 11: the placeholder graph cannot be cast, and says so in one line
        with pytest.raises(DllmExportError, match=r"model.onnx: the cast pass cannot read "
                                                  r"this graph \(.*\); re-export the artifact$"):
            build_engine(artifact, load_profile("h100-sxm"), tmp_path / "e",
                         BuildOptions(precision="fp16", timing_cache=tmp_path / "t"))
    sixteen = write_artifact(tmp_path / "art16", dtype="fp16")
    if trt_version == TRT11:
        with pytest.raises(DllmExportError, match="this artifact is fp16 and tensorrt "
                                                  f"{TRT11} builds the types the graph carries"):
            build_engine(sixteen, load_profile("h100-sxm"), tmp_path / "e",
                         BuildOptions(precision="bf16", timing_cache=tmp_path / "t"))
    with pytest.raises(DllmExportError, match="this GPU \\(NVIDIA H100 80GB HBM3\\) has compute "
                                              "capability 9.0, but profile l4 describes 8.9"):
        build_engine(artifact, load_profile("l4"), tmp_path / "e", BuildOptions())
    fakes(parse_ok=False)
    with pytest.raises(DllmExportError, match="ONNX parser failed \\(1 error\\(s\\); first: In "
                                              "node 3 \\(Attention\\)"):
        build_engine(artifact, load_profile("h100-sxm"), tmp_path / "e",
                     BuildOptions(precision="fp32"))
    fakes(version_override="10.3.0.30")
    with pytest.raises(DllmExportError, match="TensorRT 10.3.0.30 is outside the supported"):
        build_engine(artifact, load_profile("h100-sxm"), tmp_path / "e", BuildOptions())
    assert not (tmp_path / "e").exists()
    assert not list(tmp_path.glob(".dllm-cast-*"))  # the cast pass's scratch is removed


def test_cli_build_shows_progress_and_stats(tmp_path, fakes, trt_version):
    fakes()
    artifact = write_artifact(tmp_path / "art", dtype="fp32" if trt_version == TRT10 else "fp16")
    result = CliRunner().invoke(main, [
        "build", str(artifact), "--profile", "h100-sxm", "-o", str(tmp_path / "engine"),
        "--precision", "fp16", "--timing-cache", str(tmp_path / "t.cache")])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "engine") in result.output and "engine_bytes=6" in result.output
    said = ("builder flag FP16 on the fp32 graph" if trt_version == TRT10
            else "graph (fp16 artifact built as fp16)")
    assert f"precision from: {said}" in result.output


def test_build_refuses_a_graph_tensorrt_cannot_parse(tmp_path):
    from dllm_export.export.build import check_tensorrt_compatible

    manifest = {"trt_compatibility": {"clean": False, "findings": [
        {"severity": "error", "node": "model.layers.0.mlp/MoE", "op": "com.microsoft::MoE",
         "reason": "custom-domain op: TensorRT needs a plugin for it"}]}}
    with pytest.raises(DllmExportError, match=r"1 node\(s\) TensorRT cannot parse, e.g. "
                                              r"model.layers.0.mlp/MoE .*re-export with --target tensorrt"):
        check_tensorrt_compatible(tmp_path, manifest)
    check_tensorrt_compatible(tmp_path, {"trt_compatibility": {"clean": True, "findings": []}})


def test_tensorrt_11_builds_an_fp32_artifact_from_a_cast_graph(tmp_path, install_fakes,
                                                               artifact):
    """TensorRT 11 has no FP16 flag: build casts the fp32 graphs (every cached graph too),
    TensorRT parses the cast copies, and the engine's decode head stays close to fp32."""
    import onnx

    from dllm_export.runtime.backends.onnxruntime import OrtBackend

    source = artifact("llada", target="tensorrt")  # TensorRT-clean
    log = install_fakes(TRT11)
    engine = tmp_path / "engine"
    manifest = build_engine(source, load_profile("h100-sxm"), engine,
                            BuildOptions(precision="fp16", timing_cache=tmp_path / "t"))
    build = manifest["build"]
    assert build["precision_from"] == ("cast pass fp32 -> fp16 (fp32 kept for norms, "
                                       "softmax, router, decode head)")
    assert build["cast_pass"]["kept_fp32_nodes"] > 0 and build["strongly_typed"]
    assert log["network_flags"] == 0 and log["built"]["flags"] == []
    parsed = [Path(p) for p in log["parsed_all"]]
    assert sorted(p.name for p in parsed) == sorted(
        ["model.onnx", "prefill.onnx", "step.onnx", "window.onnx", "decode.onnx",
         "rows.onnx"])
    assert all(p.parent != source and not p.exists() for p in parsed)  # scratch, removed
    assert not list(tmp_path.glob(".dllm-cast-*"))
    plan = onnx.load_model_from_string((engine / "model.engine").read_bytes()[5:])
    types = {t.data_type for t in plan.graph.initializer if t.dims and len(t.dims) == 2}
    assert onnx.TensorProto.FLOAT16 in types  # the matrices are fp16 in what TensorRT built
    backend, _ = open_backend(engine)
    reference = OrtBackend(source, json.loads((source / "manifest.json").read_text()))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, size=(1, 48), dtype=np.int64)
    ids[0, 30:] = manifest["special_tokens"]["mask_id"]
    mask = np.ones_like(ids)
    got, want = backend.predict(ids, mask), reference.predict(ids, mask)
    # fp16 matrices, fp32 norms/softmax/head: the best log-prob and the entropy move by a
    # few 1e-3 on this tiny random model (fp16's 11-bit mantissa over 2 layers)
    np.testing.assert_allclose(got.topk_logprobs[..., 0], want.topk_logprobs[..., 0],
                               atol=2e-2)
    np.testing.assert_allclose(got.neg_entropy, want.neg_entropy, atol=2e-2)
    backend.close()
