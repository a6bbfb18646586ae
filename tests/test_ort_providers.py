"""The ONNX Runtime backend's GPU providers without a GPU: a session that lost the provider
it was asked for is refused (or falls back only when told to, saying so); ``build --via
ort-trt`` records its TensorRT-provider options under the key the run reads them from; a
TensorRT provider linked against another TensorRT major is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dllm_export.device_profiles import load_profile
from dllm_export.errors import DllmExportError
from dllm_export.export.build import BuildOptions, build_engine
from dllm_export.runtime.backends import onnxruntime as backend

ort = pytest.importorskip("onnxruntime")
GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class Sessions:
    """``onnxruntime.InferenceSession`` that runs on the CPU and reports ``providers``
    (what a GPU session that loaded, or lost, its providers reports)."""

    def __init__(self, reports=None, engine_cache=True):
        self.reports, self.engine_cache, self.asked = reports, engine_cache, []
        self.real = ort.InferenceSession

    def __call__(self, path, options=None, providers=None):
        self.asked.append(providers)
        first = providers[0]
        if self.engine_cache and isinstance(first, tuple):  # the TensorRT EP fills its cache
            cache = Path(first[1]["trt_engine_cache_path"])
            cache.mkdir(parents=True, exist_ok=True)
            (cache / "TensorrtExecutionProvider_TRTKernel_graph_sm90.engine").write_bytes(b"e")
        session = self.real(path, options, providers=["CPUExecutionProvider"])
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        reported = self.reports if self.reports is not None else names
        session.get_providers = lambda: list(reported)
        return session


@pytest.fixture
def gpu_onnxruntime(monkeypatch):
    """This onnxruntime as onnxruntime-gpu with a loadable TensorRT provider."""
    import dllm_export.export.build_ort_trt as build_ort_trt

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_PROVIDERS))
    for module in (backend, build_ort_trt):
        monkeypatch.setattr(module, "tensorrt_link_problem", lambda ort: None, raising=False)

    def install(sessions: Sessions) -> Sessions:
        monkeypatch.setattr(ort, "InferenceSession", sessions)
        return sessions

    return install


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


@pytest.mark.parametrize("provider, reports", [
    ("cuda", ["CPUExecutionProvider"]),
    ("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
])
def test_a_session_that_lost_its_provider_is_refused(artifact, gpu_onnxruntime, provider,
                                                     reports, capsys):
    source = artifact("llada")
    gpu_onnxruntime(Sessions(reports=reports))
    with pytest.raises(DllmExportError) as caught:
        backend.OrtBackend(source, _manifest(source), provider=provider)
    message = str(caught.value)
    lost = "CUDAExecutionProvider" if provider == "cuda" else "TensorrtExecutionProvider"
    assert f"--provider {provider}: onnxruntime created the session on " \
           f"{', '.join(reports)}, without {lost}" in message
    assert message.endswith("allow the fallback explicitly (OrtBackend(..., fallback=True))")
    assert "\n" not in message
    # told to, it falls back and says so
    ran = backend.OrtBackend(source, _manifest(source), provider=provider, fallback=True)
    assert ran.fell_back.endswith(f"running on {reports[0]} as allowed")
    assert ran.fell_back in capsys.readouterr().err


def test_a_session_with_every_provider_is_accepted(artifact, gpu_onnxruntime):
    source = artifact("llada")
    gpu_onnxruntime(Sessions())
    ran = backend.OrtBackend(source, _manifest(source), provider="cuda")
    assert ran.fell_back is None


def test_ort_trt_options_round_trip_from_build_to_run(tmp_path, artifact, gpu_onnxruntime):
    """The options the engine cache was built with are the options a run uses."""
    source = artifact("llada", target="tensorrt")
    sessions = gpu_onnxruntime(Sessions())
    out = tmp_path / "ort-engine"
    manifest = build_engine(source, load_profile("h100-sxm"), out,
                            BuildOptions(via="ort-trt", precision="bf16", cache=False))
    built = sessions.asked[0][0][1]
    assert built["trt_bf16_enable"] is True and built["trt_max_workspace_size"] == 8 << 30
    assert built["trt_builder_optimization_level"] == 3
    recorded = manifest["ort_tensorrt"]  # the key docs/architecture.md names
    assert manifest["kind"] == "onnx" and recorded["precision"] == "bf16"
    assert recorded["options"]["trt_bf16_enable"] is True
    assert list((out / "ort-trt-cache").glob("*.engine"))  # where the run looks
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()
    backend.OrtBackend(out, _manifest(out), provider="tensorrt")
    name, used = sessions.asked[-1][0]
    assert name == "TensorrtExecutionProvider"
    cache = str((out / "ort-trt-cache").resolve())
    assert used == {**built, "trt_engine_cache_path": cache, "trt_timing_cache_path": cache}


def test_recorded_options_are_made_absolute(tmp_path):
    manifest = {backend.ORT_TRT_KEY: {"options": {"trt_engine_cache_path": "ort-trt-cache",
                                                  "trt_fp16_enable": True}}}
    options = backend.recorded_tensorrt_options(tmp_path, manifest)
    assert options["trt_engine_cache_path"] == str((tmp_path / "ort-trt-cache").resolve())
    assert options["trt_fp16_enable"] is True


def _provider_library(tmp_path, soname: bytes):
    capi = tmp_path / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (capi / "libonnxruntime_providers_tensorrt.so").write_bytes(
        b"\x7fELF...libcudart.so.12\x00" + soname + b"\x00libonnxruntime.so.1\x00")
    return type("Ort", (), {"__file__": str(tmp_path / "onnxruntime" / "__init__.py"),
                            "__version__": "1.31.1"})


def test_a_tensorrt_10_provider_with_tensorrt_11_installed_is_refused(tmp_path):
    fake_ort = _provider_library(tmp_path, b"libnvinfer.so.10")
    assert backend.linked_tensorrt_major(
        tmp_path / "onnxruntime" / "capi" / "libonnxruntime_providers_tensorrt.so") == 10
    problem = backend.tensorrt_link_problem(fake_ort, installed=lambda: "11.4.0.106",
                                            can_load=lambda soname: soname == "libnvinfer.so.11")
    assert problem == (
        "onnxruntime 1.31.1's TensorRT provider links libnvinfer.so.10 (TensorRT 10.x) and "
        "this machine has TensorRT 11.4.0.106, so it cannot load: use --via tensorrt "
        "(TensorRT's own builder), or install TensorRT 10.x (pip install "
        "'tensorrt-cu12>=10,<11') with its libraries on LD_LIBRARY_PATH")
    loadable = backend.tensorrt_link_problem(fake_ort, installed=lambda: "10.16.0",
                                             can_load=lambda soname: soname.endswith(".10"))
    assert loadable is None


def test_build_via_ort_trt_refuses_the_mismatch_in_one_line(tmp_path, artifact, monkeypatch):
    source = artifact("llada")
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_PROVIDERS))
    fake_ort = _provider_library(tmp_path, b"libnvinfer.so.10")
    import dllm_export.export.build_ort_trt as build_ort_trt

    monkeypatch.setattr(build_ort_trt, "tensorrt_link_problem",
                        lambda module: backend.tensorrt_link_problem(
                            fake_ort, installed=lambda: "11.4.0.106", can_load=lambda s: False))
    with pytest.raises(DllmExportError, match=r"^--via ort-trt: onnxruntime 1.31.1's TensorRT "
                                              r"provider links libnvinfer.so.10 .* TensorRT "
                                              r"11.4.0.106, so it cannot load"):
        build_engine(source, load_profile("h100-sxm"), tmp_path / "e",
                     BuildOptions(via="ort-trt", precision="fp16", cache=False))
    assert not (tmp_path / "e").exists()


def test_cpu_onnxruntime_has_no_tensorrt_provider_library():
    """This machine's onnxruntime (CPU build): the check names the missing library."""
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    assert "has no TensorRT provider library" in backend.tensorrt_link_problem(ort)
