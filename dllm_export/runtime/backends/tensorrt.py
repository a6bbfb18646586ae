"""The TensorRT backend: an engine directory from ``dllm-export build`` on its GPU.

No torch. TensorRT (``tensorrt`` or ``tensorrt_rtx``, as the manifest says; 10.x or 11.x)
and cuda-bindings are imported when a backend is created. Every I/O tensor lives in device memory for the
backend's lifetime; a step uploads the canvas (and the attention mask only when it changed),
runs the engine (replaying a CUDA graph captured on the first step where TensorRT allows it)
and downloads only the decode head's outputs: ``[B, L, 2K + S + 1]`` numbers, not ``[B, L, V]``.

Engine directories built from an artifact with cached graphs hold one engine per cached
graph. The key/value cache is one device buffer per layer and kind, bound as every step
engine's ``past_*`` inputs and as the prefill engine's ``present_*`` outputs (the prefill
writes it in place); a commit copies a block's rows into their slots on the device
(``cudaMemcpy2DAsync``). Nothing of the cache crosses to the host.

Engines are tied to the TensorRT version and the GPU they were built with. Opening one
elsewhere is refused up front, with the command that rebuilds it, instead of TensorRT's
"Serialization assertion ... Version tag does not match".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllm_export.contract import DECODE_OUTPUTS
from dllm_export.errors import DllmExportError
from dllm_export.runtime.backends.base import Backend
from dllm_export.runtime.prediction import Prediction

ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # cache element sizes

INSTALL_HINT = {
    "tensorrt": (
        "on a Jetson it ships with JetPack (sudo apt install nvidia-jetpack; use the system "
        "python3, or a venv made with --system-site-packages); on a desktop or server: "
        "pip install tensorrt-cu12 (or tensorrt-cu13) --extra-index-url https://pypi.nvidia.com"
    ),
    "tensorrt_rtx": (
        "install TensorRT for RTX from https://developer.nvidia.com/tensorrt-rtx (Python "
        "module tensorrt_rtx), or rebuild with a profile whose engine_library is tensorrt"
    ),
}


def import_engine_library(library: str = "tensorrt"):
    """Import ``tensorrt`` or ``tensorrt_rtx``, or say in one line how to get it."""
    if library not in INSTALL_HINT:
        raise DllmExportError(f"engine library {library!r} is not one of "
                              f"{', '.join(INSTALL_HINT)}")
    try:
        return importlib.import_module(library)
    except ImportError as err:
        product = "TensorRT" if library == "tensorrt" else "TensorRT for RTX"
        raise DllmExportError(
            f"{product} is not installed (import {library} failed: {err}); "
            f"{INSTALL_HINT[library]}"
        ) from None


@dataclass(frozen=True)
class RunningStack:
    """What this machine has: compared with what an engine was built with."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def check_engine_compatibility(manifest: dict, running: RunningStack, directory: Path) -> None:
    """Refuse an engine built for another TensorRT version or GPU, in one line.

    Args:
        manifest: the engine directory's manifest (``tensorrt_version``, ``gpu_name``,
            ``compute_capability``, ``profile``, ``source_artifact``).
        running: this machine's TensorRT version and GPU.
        directory: the engine directory, named in the message.
    """
    built = []
    if manifest.get("tensorrt_version") != running.tensorrt_version:
        built.append(f"TensorRT {manifest.get('tensorrt_version')} "
                     f"(this machine has {running.tensorrt_version})")
    if manifest.get("compute_capability") != running.compute_capability:
        built.append(f"compute capability {manifest.get('compute_capability')} "
                     f"(this GPU, {running.gpu_name}, is {running.compute_capability})")
    elif manifest.get("gpu_name") != running.gpu_name:
        built.append(f"{manifest.get('gpu_name')} (this GPU is {running.gpu_name})")
    if not built:
        return
    source = (manifest.get("source_artifact") or {}).get("path", "ARTIFACT")
    raise DllmExportError(
        f"{directory}: engine was built for {' and '.join(built)}; engines do not move "
        f"between GPUs or TensorRT versions: rebuild it here with dllm-export build {source} "
        f"--profile {manifest.get('profile', 'PROFILE')} -o NEW_ENGINE_DIR"
    )


# TensorRT DataType name -> numpy type of the host copy. bfloat16 and fp8 (e4m3, TensorRT's
# only fp8) come from ml_dtypes, which trt.nptype does not know; int4 and fp4 pack two
# values per byte, which no numpy type holds.
NUMPY_TYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32",
               "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "BF16": "bfloat16",
               "FP8": "float8_e4m3fn", "E8M0": "float8_e8m0fnu"}


def numpy_dtype(trt_dtype, tensor: str, path: Path) -> np.dtype:
    """The numpy type of an engine I/O tensor of TensorRT type ``trt_dtype``."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    if name not in NUMPY_TYPES:
        raise DllmExportError(
            f"{path}: I/O tensor {tensor!r} is {name}, a packed sub-byte type the runtime "
            "cannot hold on the host; keep the graph's inputs and outputs in 8 bits or more")
    if name in ("BF16", "FP8", "E8M0"):
        try:
            import ml_dtypes
        except ImportError:
            raise DllmExportError(f"{path}: I/O tensor {tensor!r} is {name}; its numpy type "
                                  "comes from ml_dtypes: pip install ml_dtypes") from None
        return np.dtype(getattr(ml_dtypes, NUMPY_TYPES[name]))
    return np.dtype(NUMPY_TYPES[name])


class _EngineIO:
    """A deserialised engine, its execution context and one device buffer per I/O tensor
    (those in ``bound`` are shared buffers, such as the key/value cache).

    A dimension TensorRT reports as -1 (dynamic in the graph) is fixed from the engine's one
    optimisation profile (min = opt = max) with ``set_input_shape``; output shapes are then
    read from the context, where they are concrete."""

    def __init__(self, trt, runtime, path: Path, bound: dict, budget=None):
        from dllm_export.runtime import cuda

        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise DllmExportError(f"{path}: TensorRT could not load the engine (see its log "
                                  "above); rebuild it")
        if budget is not None:  # the part of the weights kept on the device
            self.engine.weight_streaming_budget_v2 = int(budget)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names
                  if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for name in inputs:
            shape = tuple(self.engine.get_tensor_shape(name))
            if -1 in shape:
                shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[1])
                if not self.context.set_input_shape(name, shape):
                    raise DllmExportError(f"{path}: TensorRT refused input {name!r} of shape "
                                          f"{list(shape)}; rebuild the engine")
        self.host, self.buffers, self.owned = {}, {}, []
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            if -1 in shape:
                raise DllmExportError(f"{path}: tensor {name!r} still has a dynamic shape "
                                      f"{list(shape)} once the inputs are set; rebuild it")
            dtype = numpy_dtype(self.engine.get_tensor_dtype(name), name, path)
            self.host[name] = np.zeros(shape, dtype)
            if name in bound:
                self.buffers[name] = bound[name]
            else:
                self.buffers[name] = cuda.DeviceBuffer(self.host[name].nbytes)
                self.owned.append(self.buffers[name])
            self.context.set_tensor_address(name, self.buffers[name].ptr)

    def free(self):
        for buffer in self.owned:
            buffer.free()
        self.owned = []


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, directory: Path, manifest: dict):
        from dllm_export import contract
        from dllm_export.runtime import cuda

        self.directory = Path(directory)
        trt = import_engine_library(manifest.get("engine_library", "tensorrt"))
        gpu = cuda.gpu_info()
        check_engine_compatibility(
            manifest, RunningStack(trt.__version__, gpu.name, gpu.compute_capability),
            self.directory)
        self.seq_len = manifest["shapes"]["seq_len"]
        self.batch_size = manifest["shapes"]["batch"]
        self.topk = manifest.get("topk", 8)
        self.special_ids = tuple(manifest.get("special_ids", ()))
        self.row_shift = int(bool(manifest.get("shift_logits")))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.stream = cuda.Stream()
        budget = manifest.get("build", {}).get("weight_streaming_budget_bytes")
        self.canvas = _EngineIO(trt, self._runtime, self.directory / manifest["engine"], {},
                                budget)
        self.engine, self.context = self.canvas.engine, self.canvas.context
        self.buffers, self.host = self.canvas.buffers, self.canvas.host
        self._last_mask = None
        self._capture_tried = False
        self.graphs = contract.graph_specs(manifest, str(self.directory / "manifest.json"))
        self.has_cached_graphs = bool(self.graphs)
        self.cache, self.cached = {}, {}
        if self.graphs:
            self._open_cached(trt, manifest, budget)

    def _open_cached(self, trt, manifest, budget):
        from dllm_export.runtime import cuda

        prefill = self.graphs["prefill"]
        heads = len(DECODE_OUTPUTS)
        for tensor in prefill.outputs[heads:]:  # [B, Hkv, C, Dh] per layer and kind
            size = int(np.prod(tensor.shape)) * ITEM_BYTES[tensor.dtype]
            self.cache[tensor.name.replace("present_", "", 1)] = cuda.DeviceBuffer(size)
        for name, spec in self.graphs.items():
            role = "present_" if spec.capacity == 0 else "past_"
            bound = {role + key: buffer for key, buffer in self.cache.items()}
            engine = manifest["cache"]["graphs"][name]["engine"]
            self.cached[name] = (_EngineIO(trt, self._runtime, self.directory / engine, bound,
                                           budget), spec)

    def _launch(self) -> bool:
        return self.context.execute_async_v3(self.stream.handle)

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs) -> dict:
        self.host["input_ids"][...] = input_ids
        self.stream.upload(self.buffers["input_ids"], self.host["input_ids"])
        if self._last_mask is None or not np.array_equal(self._last_mask, attention_mask):
            self.host["attention_mask"][...] = attention_mask
            self.stream.upload(self.buffers["attention_mask"], self.host["attention_mask"])
            self._last_mask = attention_mask.copy()
        if self.stream.captured:
            self.stream.replay()
        elif not self._launch():
            raise DllmExportError(f"{self.directory}: TensorRT failed to run the engine "
                                  "(see its log above)")
        elif not self._capture_tried:
            # TensorRT finishes its lazy setup on the first enqueue, so capture after it;
            # tensor addresses never change, so the graph stays valid for every later step.
            self._capture_tried = True
            self.stream.synchronize()
            self.stream.capture(self._launch)
        for name in outputs:
            self.stream.download(self.host[name], self.buffers[name])
        self.stream.synchronize()
        return {name: self.host[name].copy() for name in outputs}

    def _run_predict(self, input_ids, attention_mask) -> Prediction:
        if "topk_ids" not in self.host:
            raise DllmExportError(f"{self.directory}: the engine has no decode-head outputs "
                                  "(exported with --outputs logits); use an artifact exported "
                                  "with --outputs decode")
        out = self._forward(input_ids, attention_mask, DECODE_OUTPUTS)
        return self._prediction(out)

    def _prediction(self, out: dict) -> Prediction:
        """The decode head's outputs as the samplers take them (an engine may emit them in
        16 or 8 bits): int64 ids, float32 scores."""
        scores = (out[name].astype(np.float32) for name in DECODE_OUTPUTS[1:])
        return Prediction(out["topk_ids"].astype(np.int64), *scores, self.special_ids)

    def _run_logits(self, input_ids, attention_mask) -> np.ndarray:
        if "logits" not in self.host:
            return super()._run_logits(input_ids, attention_mask)
        return self._forward(input_ids, attention_mask, ("logits",))["logits"]

    # --------------------------------------------------------------- cached graphs

    def reset_cache(self, batch: int, capacity: int) -> None:
        self._check_capacity(capacity)

    def _cached_call(self, io: _EngineIO, **inputs) -> Prediction:
        for name, array in inputs.items():
            io.host[name][...] = array
            self.stream.upload(io.buffers[name], io.host[name])
        if not io.context.execute_async_v3(self.stream.handle):
            raise DllmExportError(f"{self.directory}: TensorRT failed to run a cached engine")
        for name in DECODE_OUTPUTS:
            self.stream.download(io.host[name], io.buffers[name])
        self.stream.synchronize()
        return self._prediction({name: io.host[name].copy() for name in DECODE_OUTPUTS})

    def _run_prefill(self, input_ids, position_ids, attention_mask) -> Prediction:
        io, _ = self.cached["prefill"]
        return self._cached_call(io, input_ids=input_ids, position_ids=position_ids,
                                 attention_mask=attention_mask)

    def _run_rows(self, input_ids, attention_mask, head_rows) -> Prediction:
        io, _ = self.cached["rows"]
        return self._cached_call(io, input_ids=input_ids, attention_mask=attention_mask,
                                 head_rows=head_rows)

    def _run_cached_step(self, input_ids, position_ids, attention_mask, write) -> Prediction:
        rows = input_ids.shape[1]
        io, spec = self.cached[self._graph_for(rows)]
        pred = self._cached_call(io, input_ids=input_ids, position_ids=position_ids,
                                 attention_mask=attention_mask)
        self._last_call = (io, spec, rows)  # its present buffers hold until the next call
        if write is not None:
            self.commit(write)
        return pred

    def commit(self, write) -> None:
        """Copy rows of the last cached call's presents into their cache slots, on the
        device (one strided 2-D copy per layer and kind)."""
        io, spec, rows = self._last_call
        row, slot, count = write
        for key, cache in self.cache.items():
            present = io.host["present_" + key]
            batch, heads, _, width = present.shape
            item = width * present.itemsize  # one slot of one head, in bytes
            self.stream.copy_rows(cache, slot * item, spec.capacity * item,
                                  io.buffers["present_" + key], row * item, rows * item,
                                  count * item, batch * heads)
        self.stream.synchronize()

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self.stream.close()
            self.stream = None
        for io, _ in getattr(self, "cached", {}).values():
            io.free()
        for buffer in getattr(self, "cache", {}).values():
            buffer.free()
        if getattr(self, "canvas", None) is not None:
            self.canvas.free()
        self.cached, self.cache, self.buffers = {}, {}, {}
