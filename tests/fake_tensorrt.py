"""Stand-ins for ``tensorrt`` (10.x or 11.x) and the CUDA runtime, just big enough to drive
the build and the TensorRT backend on a CPU. They carry the real enum values and the names
each version removed, take the real cuda-bindings types, and reject what the real ones
reject; device "memory" is host memory, so uploads, downloads and CUDA-graph replay run
for real over the bytes.

Facts copied from NVIDIA/TensorRT's public headers and Python bindings (tags v10.16 and
v11.1: ``include/NvInfer.h``, ``include/NvInferRuntimeBase.h``,
``python/src/infer/pyCore.cpp``, ``python/src/infer/pyFoundationalTypes.cpp``,
``python/packaging/bindings_wheel/tensorrt/__init__.py``):

- ``NetworkDefinitionCreationFlag``: 10.x EXPLICIT_BATCH = 0 (ignored), STRONGLY_TYPED = 1,
  PREFER_JIT/AOT_PYTHON_PLUGINS = 2/3; 11.x STRONGLY_TYPED = 0 (ignored: always strongly
  typed), PREFER_JIT/AOT = 1/2. ``create_network`` takes a bit mask of them.
- ``BuilderFlag``: 11.x removed FP16, BF16, INT8, FP8, INT4, FP4, OBEY/PREFER_PRECISION_
  CONSTRAINTS, REJECT_EMPTY_ALGORITHMS and WEIGHTLESS, and renumbered what follows.
- ``DataType`` (both): FLOAT 0, HALF 1, INT8 2, INT32 3, BOOL 4, UINT8 5, FP8 6, BF16 7,
  INT64 8, INT4 9, FP4 10, E8M0 11; ``trt.nptype`` maps only the first six and UINT8 and
  raises TypeError for the others.
- ``execute_async_v3(stream_handle: int)`` (a ``size_t``); ``get_tensor_shape`` has -1 for a
  dynamic dimension until ``set_input_shape`` fixes it on the execution context.

A real ONNX file builds an "engine" holding the serialized graph, which then runs with ONNX
Runtime on the tensors at the bound addresses; the unit tests' placeholder files build a toy
engine. Both report the batch dimension as dynamic (-1), as an engine from a graph with a
dynamic batch does.
"""

from __future__ import annotations

import ctypes
import enum
import types

import numpy as np
from cuda.bindings import runtime as cuda_runtime

TOPK, SPECIALS = 4, 1
TRT10, TRT11 = "10.16.0", "11.4.0.106"

BUILDER_FLAGS = {
    10: dict(FP16=0, INT8=1, DEBUG=2, GPU_FALLBACK=3, REFIT=4, DISABLE_TIMING_CACHE=5,
             TF32=6, SPARSE_WEIGHTS=7, SAFETY_SCOPE=8, OBEY_PRECISION_CONSTRAINTS=9,
             PREFER_PRECISION_CONSTRAINTS=10, DIRECT_IO=11, REJECT_EMPTY_ALGORITHMS=12,
             VERSION_COMPATIBLE=13, EXCLUDE_LEAN_RUNTIME=14, FP8=15,
             ERROR_ON_TIMING_CACHE_MISS=16, BF16=17, DISABLE_COMPILATION_CACHE=18,
             STRIP_PLAN=19, WEIGHTLESS=19, REFIT_IDENTICAL=20, WEIGHT_STREAMING=21, INT4=22,
             REFIT_INDIVIDUAL=23, STRICT_NANS=24, MONITOR_MEMORY=25, FP4=26,
             EDITABLE_TIMING_CACHE=27, DISTRIBUTIVE_INDEPENDENCE=28),
    11: dict(DEBUG=2, GPU_FALLBACK=3, REFIT=4, DISABLE_TIMING_CACHE=5, TF32=6,
             SPARSE_WEIGHTS=7, SAFETY_SCOPE=8, DIRECT_IO=11, VERSION_COMPATIBLE=12,
             EXCLUDE_LEAN_RUNTIME=13, ERROR_ON_TIMING_CACHE_MISS=15,
             DISABLE_COMPILATION_CACHE=17, STRIP_PLAN=18, REFIT_IDENTICAL=19,
             WEIGHT_STREAMING=20, REFIT_INDIVIDUAL=22, STRICT_NANS=23, MONITOR_MEMORY=24,
             EDITABLE_TIMING_CACHE=26, DISTRIBUTIVE_INDEPENDENCE=27),
}
NETWORK_FLAGS = {
    10: dict(EXPLICIT_BATCH=0, STRONGLY_TYPED=1, PREFER_JIT_PYTHON_PLUGINS=2,
             PREFER_AOT_PYTHON_PLUGINS=3),
    11: dict(STRONGLY_TYPED=0, PREFER_JIT_PYTHON_PLUGINS=1, PREFER_AOT_PYTHON_PLUGINS=2),
}
DataType = enum.IntEnum("DataType", dict(FLOAT=0, HALF=1, INT8=2, INT32=3, BOOL=4, UINT8=5,
                                         FP8=6, BF16=7, INT64=8, INT4=9, FP4=10, E8M0=11))
DTYPE_ALIASES = dict(float32="FLOAT", float16="HALF", bfloat16="BF16", int8="INT8",
                     int32="INT32", int64="INT64", bool="BOOL", uint8="UINT8", fp8="FP8",
                     int4="INT4", fp4="FP4", e8m0="E8M0")
TensorIOMode = enum.IntEnum("TensorIOMode", dict(NONE=0, INPUT=1, OUTPUT=2))


def real_nptype(trt_type):
    """``tensorrt.nptype`` as the bindings define it (no bfloat16, fp8, int4, fp4)."""
    mapping = {DataType.FLOAT: np.float32, DataType.HALF: np.float16,
               DataType.INT8: np.int8, DataType.INT32: np.int32, DataType.INT64: np.int64,
               DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}
    if trt_type in mapping:
        return mapping[trt_type]
    raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")


def storage_dtype(trt_type):
    """The numpy type of a tensor's bytes here (ml_dtypes for bf16 and fp8)."""
    import ml_dtypes

    extra = {DataType.BF16: ml_dtypes.bfloat16, DataType.FP8: ml_dtypes.float8_e4m3fn}
    return np.dtype(extra.get(trt_type) or real_nptype(trt_type))


class _Config:
    def __init__(self, log):
        self.log, self.flags, self.profiles = log, [], []
        self.builder_optimization_level = None
        self.progress_monitor = None
        self._cache = None

    def set_memory_pool_limit(self, pool, size):
        self.log["workspace"] = (pool, size)

    def set_flag(self, flag):
        self.flags.append(flag.name)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, blob):
        self.log["timing_cache_in"] = bytes(blob)
        return types.SimpleNamespace(serialize=lambda: b"timings:" + bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        self._cache = cache

    def get_timing_cache(self):
        return self._cache


class _Network:
    def __init__(self, flags):
        self.flags = flags
        self.inputs = [types.SimpleNamespace(name=n) for n in ("input_ids", "attention_mask")]
        self.onnx_path = None

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, index):
        return self.inputs[index]


def make_tensorrt(log: dict, version: str = TRT10, parse_ok: bool = True):
    """A fake ``tensorrt`` module of ``version`` (10.x or 11.x); ``log`` receives what the
    builder was asked to do."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    network_flags = enum.IntEnum("NetworkDefinitionCreationFlag", NETWORK_FLAGS[major])

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            pass

    class IProgressMonitor:
        def __init__(self):
            pass

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (low, opt, high)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            if flags >> len(network_flags):
                raise ValueError(f"create_network: flag bits {flags:#x} outside "
                                 f"NetworkDefinitionCreationFlag of TensorRT {version}")
            log["network_flags"] = flags
            return _Network(flags)

        def create_builder_config(self):
            log["config"] = _Config(log)
            return log["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            monitor = config.progress_monitor
            if monitor is not None:
                monitor.phase_start("Building engine", None, 2)
                monitor.step_complete("Building engine", 0)
                monitor.phase_finish("Building engine")
            log["built"] = {"flags": config.flags, "level": config.builder_optimization_level,
                            "shapes": config.profiles[0].shapes}
            log.setdefault("builds", []).append(network.onnx_path)
            if network.onnx_path is not None:  # the plan holds the graph, weights included
                import onnx

                return memoryview(b"ONNX:" + onnx.load(network.onnx_path).SerializeToString())
            return memoryview(b"ENGINE")

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            log["parsed"] = path
            log.setdefault("parsed_all", []).append(path)
            try:
                import onnx

                graph = onnx.load(path, load_external_data=False).graph
            except Exception:  # the unit tests' placeholder bytes
                return parse_ok
            self.network.inputs = [types.SimpleNamespace(name=i.name) for i in graph.input]
            self.network.onnx_path = path
            return parse_ok

        def get_error(self, index):
            return "In node 3 (Attention): UNSUPPORTED_NODE: softcap"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.IProgressMonitor = IProgressMonitor
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", BUILDER_FLAGS[major])
    trt.NetworkDefinitionCreationFlag = network_flags
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.DataType, trt.TensorIOMode = DataType, TensorIOMode
    for alias, name in DTYPE_ALIASES.items():
        setattr(trt, alias, DataType[name])
    trt.Runtime = lambda logger: _Runtime(log)
    trt.nptype = real_nptype
    return trt


class _Engine:
    """A decode-head engine with 8 positions and a dynamic batch (1 in its profile); outputs
    depend on the input. ``dtypes`` overrides an output's TensorRT type."""

    def __init__(self, log, dtypes=None):
        self.log = log
        length = 8
        self.tensors = {"input_ids": ((1, length), DataType.INT64),
                        "attention_mask": ((1, length), DataType.INT64),
                        "topk_ids": ((1, length, TOPK), DataType.INT64),
                        "topk_logprobs": ((1, length, TOPK), DataType.FLOAT),
                        "neg_entropy": ((1, length), DataType.FLOAT),
                        "special_logprobs": ((1, length, SPECIALS), DataType.FLOAT)}
        for name, dtype in (dtypes or {}).items():
            self.tensors[name] = (self.tensors[name][0], dtype)
        self.names = list(self.tensors)
        self.inputs = ["input_ids", "attention_mask"]

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_shape(self, name):
        return (-1, *self.tensors[name][0][1:])  # the batch is dynamic

    def get_tensor_profile_shape(self, name, profile_index):
        if name not in self.inputs or profile_index != 0:
            raise RuntimeError(f"get_tensor_profile_shape: {name!r} is not an input")
        return [self.tensors[name][0]] * 3  # min = opt = max

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]

    def create_execution_context(self):
        self.log["context"] = _Context(self)
        return self.log["context"]


class _Context:
    def __init__(self, engine):
        self.engine, self.addresses, self.shapes = engine, {}, {}

    def set_tensor_address(self, name, pointer):
        if not isinstance(pointer, int):
            raise TypeError(f"set_tensor_address(): pointer must be an int, got {pointer!r}")
        self.addresses[name] = pointer
        return True

    def set_input_shape(self, name, shape):
        if tuple(shape) != self.engine.tensors[name][0]:
            return False  # outside the optimisation profile
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if all(n in self.shapes for n in self.engine.inputs):
            return self.engine.tensors[name][0]
        return self.engine.get_tensor_shape(name)

    def _view(self, name):
        shape, dtype = self.engine.tensors[name]
        dtype = storage_dtype(dtype)
        count = int(np.prod(shape)) * dtype.itemsize
        raw = (ctypes.c_char * count).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def _check_launch(self, stream):
        if type(stream) is not int:  # pybind11 size_t: a cudaStream_t object is refused
            raise TypeError("execute_async_v3(): incompatible function arguments; "
                            f"stream_handle: int, got {type(stream).__name__}")
        if stream not in self.engine.log.setdefault("streams", set()):
            return False  # not a stream cudaStreamCreate returned: CUDA error, no launch
        if set(self.shapes) != set(self.engine.inputs):
            return False  # "not all input dimensions specified"
        missing = set(self.engine.names) - set(self.addresses)
        if missing:
            return False
        self.engine.log["launches"] = self.engine.log.get("launches", 0) + 1
        if self.engine.log.get("capturing"):  # a CUDA graph records this context's launch
            self.engine.log["captured_context"] = self
            self.engine.log["captured_stream"] = stream
        return True

    def execute_async_v3(self, stream):
        if not self._check_launch(stream):
            return False
        ids, mask = self._view("input_ids"), self._view("attention_mask")
        self._view("topk_ids")[...] = (ids[..., None] + np.arange(TOPK)) * mask[..., None]
        self._view("topk_logprobs")[...] = -np.arange(TOPK, dtype=np.float32)
        self._view("neg_entropy")[...] = -mask
        self._view("special_logprobs")[...] = -1.0
        return True


class _Runtime:
    def __init__(self, log):
        self.log = log

    def deserialize_cuda_engine(self, blob):
        blob = bytes(blob)
        self.log["deserialized"] = blob[:64]
        if blob.startswith(b"ONNX:"):
            return _OnnxEngine(self.log, blob[5:])
        return _Engine(self.log, self.log.get("engine_dtypes")) if blob == b"ENGINE" else None


ONNX_TYPES = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF,
              "tensor(bfloat16)": DataType.BF16, "tensor(int64)": DataType.INT64,
              "tensor(bool)": DataType.BOOL}


class _OnnxEngine(_Engine):
    """A real graph's I/O, run by ONNX Runtime over the memory at the bound addresses."""

    def __init__(self, log, model_bytes):
        import onnxruntime as ort

        self.log = log
        self.session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        self.tensors = {t.name: (tuple(t.shape), ONNX_TYPES[t.type])
                        for t in (*self.session.get_inputs(), *self.session.get_outputs())}
        self.inputs = [t.name for t in self.session.get_inputs()]
        self.names = list(self.tensors)

    def create_execution_context(self):
        context = _OnnxContext(self)
        self.log.setdefault("contexts", []).append(context)
        return context


class _OnnxContext(_Context):
    def execute_async_v3(self, stream):
        if not self._check_launch(stream):
            return False
        feeds = {name: self._view(name).copy() for name in self.engine.inputs}
        outputs = [n for n in self.engine.names if n not in self.engine.inputs]
        for name, value in zip(outputs, self.engine.session.run(outputs, feeds), strict=True):
            self._view(name)[...] = value
        return True


OK = cuda_runtime.cudaError_t.cudaSuccess


class FakeCudart:
    """``cuda.bindings.runtime`` over host memory, with its real enums and handle types;
    graph replay re-runs the captured launch."""

    cudaMemcpyKind = cuda_runtime.cudaMemcpyKind
    cudaStreamCaptureMode = cuda_runtime.cudaStreamCaptureMode
    cudaError_t = cuda_runtime.cudaError_t

    def __init__(self, log, capture_ok=True):
        self.log, self.capture_ok, self.memory = log, capture_ok, {}
        self.capturing, self.captured = False, []
        self.streams = log.setdefault("streams", set())

    def _stream(self, stream):
        if not isinstance(stream, (cuda_runtime.cudaStream_t, int)):
            raise TypeError(f"Argument 'stream' is not instance of type (expected <class "
                            f"'int'>, or cudaStream_t), got {type(stream).__name__}")
        if int(stream) not in self.streams:
            raise AssertionError(f"stream {int(stream):#x} was never created")

    def cudaGetDeviceCount(self):
        return OK, 1

    def cudaGetDeviceProperties(self, device):
        return OK, types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3", major=9, minor=0,
                                         totalGlobalMem=80 << 30)

    def cudaRuntimeGetVersion(self):
        return OK, 12080

    def cudaMemGetInfo(self):
        return OK, 70 << 30, 80 << 30

    def cudaGetErrorName(self, err):
        return cuda_runtime.cudaGetErrorName(err)

    def cudaMalloc(self, size):
        block = np.zeros(size, np.uint8)
        self.memory[block.ctypes.data] = block
        return OK, block.ctypes.data

    def cudaFree(self, pointer):
        self.memory.pop(pointer)
        return (OK,)

    def cudaStreamCreate(self):
        value = 0x7F00_0000 + 0x100 * (len(self.streams) + 1)
        self.streams.add(value)
        return OK, cuda_runtime.cudaStream_t(value)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        self._stream(stream)
        self.log.setdefault("copies", []).append((int(kind), count))
        ctypes.memmove(dst, src, count)
        return (OK,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        self._stream(stream)
        self.log.setdefault("copies_2d", []).append((int(kind), width, height))
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return (OK,)

    def cudaStreamSynchronize(self, stream):
        self._stream(stream)
        return (OK,)

    def cudaStreamBeginCapture(self, stream, mode):
        self._stream(stream)
        self.capturing = self.log["capturing"] = True
        return (OK,)

    def cudaStreamEndCapture(self, stream):
        self.capturing = self.log["capturing"] = False
        failed = cuda_runtime.cudaError_t.cudaErrorStreamCaptureInvalidated
        return (OK if self.capture_ok else failed), cuda_runtime.cudaGraph_t(0x6000)

    def cudaGetLastError(self):
        return (OK,)

    def cudaGraphInstantiate(self, graph, flags):
        return OK, cuda_runtime.cudaGraphExec_t(0x6100)

    def cudaGraphLaunch(self, graph_exec, stream):
        self._stream(stream)
        self.log["replays"] = self.log.get("replays", 0) + 1
        context = self.log["captured_context"]
        context.execute_async_v3(self.log["captured_stream"])
        return (OK,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (OK,)

    def cudaGraphDestroy(self, graph):
        return (OK,)

    def cudaStreamDestroy(self, stream):
        self._stream(stream)
        self.streams.discard(int(stream))
        return (OK,)
