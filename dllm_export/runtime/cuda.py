"""The few CUDA runtime calls the TensorRT build and backend need, through cuda-bindings.

No torch: ``cuda.bindings.runtime`` (cuda-bindings 12.x and 13.x, also what cuda-python
12.6.1 and later install) is imported on first use; the older ``cuda.cudart`` module is gone
in 13.0 and is not used. Every call returns ``(error, values...)``; ``call`` turns a failure
into a ``DllmExportError`` that names the call. Handles (``cudaStream_t``, ...) are wrapper
objects: ``handle`` gives the integer value TensorRT's ``execute_async_v3`` takes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

from dllm_export.errors import DllmExportError


@lru_cache(maxsize=1)
def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError as err:
        raise DllmExportError(
            f"cuda-bindings is not installed (import cuda.bindings.runtime failed: {err}); "
            "the TensorRT path uses it for device memory and streams: pip install "
            "cuda-bindings (12.x for a CUDA 12 driver, 13.x for CUDA 13)"
        ) from None
    return runtime


def call(result, what: str):
    """Unpack a cuda-bindings result tuple, raising on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, name = cudart().cudaGetErrorName(err)
        raise DllmExportError(f"CUDA error in {what}: {name.decode()} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def handle(obj) -> int:
    """The integer value of a handle (``cudaStream_t``, ``CUstream``, a device pointer).

    Not ``obj.getPtr()``: that is the address of the wrapper's own storage, not the stream.
    cuda-bindings documents ``int(obj)`` and ``cuda.bindings.utils.get_cuda_native_handle``."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    try:
        return int(get_cuda_native_handle(obj))
    except TypeError:  # a type it does not register (a plain pointer wrapper): its value
        return int(obj)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    total_memory: int
    cuda_runtime: str  # "12.6"


def gpu_info(device: int = 0) -> GpuInfo:
    """Name, compute capability, memory and CUDA runtime version of a GPU."""
    runtime = cudart()
    count = call(runtime.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not count:
        raise DllmExportError("no CUDA GPU is visible (cudaGetDeviceCount returned 0)")
    props = call(runtime.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    version = call(runtime.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(
        name=name.split("\x00", 1)[0].strip(),
        compute_capability=f"{props.major}.{props.minor}",
        total_memory=int(props.totalGlobalMem),
        cuda_runtime=f"{version // 1000}.{version % 1000 // 10}",
    )


def used_device_memory() -> int:
    free, total = call(cudart().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(total) - int(free)


class DeviceMemoryPeak:
    """Samples device-wide memory in use while a block runs (every ``interval`` seconds).

    cudaMemGetInfo sees every process on the GPU (and, on a Jetson, all of the unified
    memory), so this is the device's peak, an upper bound on ours."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, used_device_memory())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = used_device_memory()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, used_device_memory())


class DeviceBuffer:
    """A device allocation of ``nbytes``; ``ptr`` is its address as an int."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self._ptr = call(cudart().cudaMalloc(self.nbytes), "cudaMalloc")
        self.ptr = handle(self._ptr)

    def free(self):
        if self._ptr is not None:
            call(cudart().cudaFree(self._ptr), "cudaFree")
            self._ptr = None


class Stream:
    """A CUDA stream with host<->device copies and an optional captured CUDA graph."""

    def __init__(self):
        self.runtime = cudart()
        self._stream = call(self.runtime.cudaStreamCreate(), "cudaStreamCreate")
        self.handle = handle(self._stream)
        self._graph = self._graph_exec = None

    def upload(self, buffer: DeviceBuffer, array) -> None:
        kind = self.runtime.cudaMemcpyKind.cudaMemcpyHostToDevice
        call(self.runtime.cudaMemcpyAsync(buffer.ptr, array.ctypes.data, array.nbytes, kind,
                                          self._stream), "cudaMemcpyAsync (to device)")

    def download(self, array, buffer: DeviceBuffer) -> None:
        kind = self.runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost
        call(self.runtime.cudaMemcpyAsync(array.ctypes.data, buffer.ptr, array.nbytes, kind,
                                          self._stream), "cudaMemcpyAsync (to host)")

    def copy_rows(self, dst: DeviceBuffer, dst_offset: int, dst_pitch: int,
                  src: DeviceBuffer, src_offset: int, src_pitch: int, width: int,
                  height: int) -> None:
        """Device-to-device copy of ``height`` rows of ``width`` bytes (cudaMemcpy2DAsync):
        a commit writes a block's keys into its slots of every head at once."""
        kind = self.runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        call(self.runtime.cudaMemcpy2DAsync(dst.ptr + dst_offset, dst_pitch,
                                            src.ptr + src_offset, src_pitch, width, height,
                                            kind, self._stream),
             "cudaMemcpy2DAsync (device to device)")

    def synchronize(self) -> None:
        call(self.runtime.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def capture(self, launch) -> bool:
        """Record ``launch()`` into a CUDA graph; False (and nothing kept) if it cannot be
        captured, in which case the caller keeps launching directly."""
        runtime = self.runtime
        mode = runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        if int(runtime.cudaStreamBeginCapture(self._stream, mode)[0]) != 0:
            return False
        try:
            ok = bool(launch())
        except Exception:  # an enqueue that cannot be captured: run uncaptured instead
            ok = False
        err, graph = runtime.cudaStreamEndCapture(self._stream)
        if not ok or int(err) != 0:
            runtime.cudaGetLastError()  # clear the capture error so later calls succeed
            return False
        err, graph_exec = runtime.cudaGraphInstantiate(graph, 0)
        if int(err) != 0:
            runtime.cudaGraphDestroy(graph)
            return False
        self._graph, self._graph_exec = graph, graph_exec
        return True

    @property
    def captured(self) -> bool:
        return self._graph_exec is not None

    def replay(self) -> None:
        call(self.runtime.cudaGraphLaunch(self._graph_exec, self._stream), "cudaGraphLaunch")

    def close(self) -> None:
        runtime = self.runtime
        if self._graph_exec is not None:
            runtime.cudaGraphExecDestroy(self._graph_exec)
            runtime.cudaGraphDestroy(self._graph)
            self._graph_exec = self._graph = None
        if self._stream is not None:
            runtime.cudaStreamDestroy(self._stream)
            self._stream = None
