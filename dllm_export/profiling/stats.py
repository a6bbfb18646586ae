"""Small measurement helpers: latency summaries, host and device memory peaks, machine load.

Host memory is the process's resident set: the peak is reset (``/proc/self/clear_refs``) just
before a measurement so that it covers the runs, not the loading. Device memory is read only
where a GPU is in use, through imports that are guarded: on a machine without one the
report says "not available".
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import numpy as np


def summarize_ms(seconds: list) -> dict:
    """Median, p90, p99, min and max in milliseconds (nearest-rank percentiles) and the count.

    With fewer than 100 samples p99 is close to the maximum: the count says how many.
    """
    if not seconds:
        return {"count": 0}
    values = np.sort(np.asarray(seconds, dtype=np.float64)) * 1e3

    def rank(q: float) -> float:
        return float(values[min(len(values) - 1, int(np.ceil(q * len(values))) - 1)])

    return {
        "median_ms": float(statistics.median(values)),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "min_ms": float(values[0]),
        "max_ms": float(values[-1]),
        "count": len(values),
    }


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_host_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) for this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_memory() -> dict:
    """Current and peak resident set of this process, in bytes (Linux; else empty)."""
    current, peak = _status_kib("VmRSS"), _status_kib("VmHWM")
    if current is None:
        import resource

        return {
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        }
    return {"rss_bytes": current * 1024, "peak_rss_bytes": peak * 1024}


class DeviceMemory:
    """Peak GPU memory during a measurement: torch's allocator for the torch backend, the
    driver's free-memory reading otherwise. Everything is guarded; ``as_dict`` says why a
    reading is missing."""

    def __init__(self, backend_name: str, device: str = "cpu", provider: str = "cpu"):
        self.backend_name = backend_name
        self.torch_cuda = backend_name == "torch" and device.startswith("cuda")
        self.device = device
        # TensorRT engines and ONNX Runtime's GPU providers: ask the driver.
        self.driver = backend_name == "tensorrt" or (
            backend_name == "onnxruntime" and provider != "cpu"
        )
        self.reason, self.baseline, self.low_free = None, None, None

    def start(self):
        if self.torch_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if not self.driver:
            self.reason = f"not available: {self.backend_name} runs on the CPU here"
            return
        try:
            from dllm_export.runtime import cuda

            free, _ = cuda.call(cuda.cudart().cudaMemGetInfo(), "cudaMemGetInfo")
            self.baseline = self.low_free = free
        except Exception as err:  # no cuda-python or no GPU: say so instead of failing
            self.reason = f"not available: {type(err).__name__}: {err}"

    def sample(self):
        if self.baseline is None:
            return
        from dllm_export.runtime import cuda

        free, _ = cuda.call(cuda.cudart().cudaMemGetInfo(), "cudaMemGetInfo")
        self.low_free = min(self.low_free, free)

    def as_dict(self) -> dict:
        if self.reason:
            return {"device_memory": self.reason}
        if self.torch_cuda:
            import torch

            return {
                "device_peak_allocated_bytes": torch.cuda.max_memory_allocated(
                    self.device
                )
            }
        # Call start() before the engine is opened: TensorRT allocates its memory then.
        return {
            "device_used_bytes": self.baseline - self.low_free,
            "device_memory_note": "cudaMemGetInfo: free memory before the engine was "
            "opened minus the lowest reading during the runs",
        }


def machine_load() -> dict:
    """The 1-minute load average and the CPU count: how shared the machine was."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"load_average_1min": load, "cpus": os.cpu_count()}
