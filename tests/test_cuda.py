"""runtime/cuda.py against the real cuda-bindings (it imports and answers without a GPU or
a driver: every call returns cudaErrorInsufficientDriver there)."""

from __future__ import annotations

import sys
import types

import pytest

from dllm_export.errors import DllmExportError
from dllm_export.runtime import cuda

cuda_runtime = pytest.importorskip("cuda.bindings.runtime")
cuda_driver = pytest.importorskip("cuda.bindings.driver")


@pytest.mark.parametrize("make", [cuda_runtime.cudaStream_t, cuda_driver.CUstream,
                                  cuda_runtime.cudaGraphExec_t, int])
def test_handle_is_the_value_not_the_wrappers_address(make):
    stream = make(0x7F00_1234)
    assert cuda.handle(stream) == 0x7F00_1234
    if hasattr(stream, "getPtr"):  # what the old code handed TensorRT
        assert stream.getPtr() != 0x7F00_1234


def test_stream_hands_tensorrt_the_created_stream(monkeypatch):
    """Stream.handle is the int of the cudaStream_t that cudaStreamCreate returned."""
    from fake_tensorrt import FakeCudart

    log: dict = {}
    fake = FakeCudart(log)
    monkeypatch.setattr(cuda, "cudart", lambda: fake)
    stream = cuda.Stream()
    assert isinstance(stream._stream, cuda_runtime.cudaStream_t)
    assert type(stream.handle) is int and stream.handle in log["streams"]
    stream.close()
    assert log["streams"] == set()


def test_cudart_is_cuda_bindings_runtime():
    cuda.cudart.cache_clear()
    assert cuda.cudart() is cuda_runtime


def test_no_fallback_to_the_removed_cuda_cudart_module(monkeypatch):
    """cuda-python before 12.6.1 had ``cuda.cudart``; 13.0 removed it: not used."""
    cuda.cudart.cache_clear()
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", types.ModuleType("cuda.cudart"))
    try:
        with pytest.raises(DllmExportError, match=r"^cuda-bindings is not installed \(import "
                                                  r"cuda.bindings.runtime failed.*pip install "
                                                  r"cuda-bindings"):
            cuda.cudart()
    finally:
        cuda.cudart.cache_clear()


def test_a_cuda_error_is_one_line_naming_the_call():
    """Through the real bindings: without a driver, the error cudaGetDeviceCount returns."""
    cuda.cudart.cache_clear()
    err, count = cuda_runtime.cudaGetDeviceCount()
    if err == cuda_runtime.cudaError_t.cudaSuccess and count:
        info = cuda.gpu_info()
        assert info.compute_capability.count(".") == 1 and info.total_memory > 0
        return
    _, name = cuda_runtime.cudaGetErrorName(err)
    with pytest.raises(DllmExportError) as caught:
        cuda.gpu_info()
    assert str(caught.value) == (f"CUDA error in cudaGetDeviceCount: {name.decode()} "
                                 f"({int(err)})")
