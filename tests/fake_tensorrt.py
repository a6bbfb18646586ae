"""Stand-ins for ``tensorrt`` and cuda-python's runtime, just big enough to drive the build
and the TensorRT backend on a CPU: they record what our code asks of TensorRT's documented
API and move bytes for real (device "memory" is host memory), so the backend's step loop,
its uploads, downloads and CUDA-graph replay are exercised end to end.

A real ONNX file builds an "engine" that runs the graph with ONNX Runtime on the tensors
at the addresses the backend bound (fixed shapes from the graph, as TensorRT's parser
reads them); the placeholder files of the unit tests build a toy engine instead."""

from __future__ import annotations

import ctypes
import enum
import types

import numpy as np

TOPK, SPECIALS = 4, 1


class _Flags(enum.IntEnum):
    FP16 = 0
    BF16 = 1
    REFIT = 2
    WEIGHT_STREAMING = 3


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


def make_tensorrt(log: dict, version: str = "10.8.0.43", parse_ok: bool = True):
    """A fake ``tensorrt`` module; ``log`` receives what the builder was asked to do."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

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

        def create_network(self, flags):
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
            if network.onnx_path is not None:
                return memoryview(b"ONNX:" + network.onnx_path.encode())
            return memoryview(b"ENGINE")

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            log["parsed"] = path
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
    trt.IProgressMonitor, trt.BuilderFlag = IProgressMonitor, _Flags
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.Runtime = lambda logger: _Runtime(log)
    trt.nptype = lambda dtype: dtype
    return trt


class _Engine:
    """I/O of a decode-head engine with batch 1 and 8 positions; outputs depend on input."""

    def __init__(self, log):
        self.log = log
        length = 8
        self.tensors = {"input_ids": ((1, length), np.int64),
                        "attention_mask": ((1, length), np.int64),
                        "topk_ids": ((1, length, TOPK), np.int64),
                        "topk_logprobs": ((1, length, TOPK), np.float32),
                        "neg_entropy": ((1, length), np.float32),
                        "special_logprobs": ((1, length, SPECIALS), np.float32)}
        self.names = list(self.tensors)

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_shape(self, name):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]

    def create_execution_context(self):
        self.log["context"] = _Context(self)
        return self.log["context"]


class _Context:
    def __init__(self, engine):
        self.engine, self.addresses = engine, {}

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return True

    def _view(self, name):
        shape, dtype = self.engine.tensors[name]
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = (ctypes.c_char * count).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream):
        self.engine.log["launches"] = self.engine.log.get("launches", 0) + 1
        if self.engine.log.get("capturing"):  # a CUDA graph records this context's launch
            self.engine.log["captured_context"] = self
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
        self.log["deserialized"] = bytes(blob)
        if bytes(blob).startswith(b"ONNX:"):
            return _OnnxEngine(self.log, bytes(blob)[5:].decode())
        return _Engine(self.log) if blob == b"ENGINE" else None


ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


class _OnnxEngine(_Engine):
    """A real graph's I/O, run by ONNX Runtime over the memory at the bound addresses."""

    def __init__(self, log, path):
        import onnxruntime as ort

        self.log, self.path = log, path
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
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
        self.engine.log["launches"] = self.engine.log.get("launches", 0) + 1
        if self.engine.log.get("capturing"):
            self.engine.log["captured_context"] = self
        feeds = {name: self._view(name).copy() for name in self.engine.inputs}
        outputs = [n for n in self.engine.names if n not in self.engine.inputs]
        for name, value in zip(outputs, self.engine.session.run(outputs, feeds), strict=True):
            self._view(name)[...] = value
        return True


class FakeCudart:
    """cuda-python's runtime over host memory; graph replay re-runs the captured launch."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                           cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=0)

    def __init__(self, log, capture_ok=True):
        self.log, self.capture_ok, self.memory = log, capture_ok, {}
        self.capturing, self.captured = False, []

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetDeviceProperties(self, device):
        return 0, types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3", major=9, minor=0,
                                        totalGlobalMem=80 << 30)

    def cudaRuntimeGetVersion(self):
        return 0, 12080

    def cudaMemGetInfo(self):
        return 0, 70 << 30, 80 << 30

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"

    def cudaMalloc(self, size):
        block = np.zeros(size, np.uint8)
        self.memory[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaFree(self, pointer):
        self.memory.pop(pointer)
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        self.log.setdefault("copies", []).append((kind, count))
        ctypes.memmove(dst, src, count)
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        self.log.setdefault("copies_2d", []).append((kind, width, height))
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = self.log["capturing"] = True
        return (0,)

    def cudaStreamEndCapture(self, stream):
        self.capturing = self.log["capturing"] = False
        return (0 if self.capture_ok else 900), "graph"

    def cudaGetLastError(self):
        return (0,)

    def cudaGraphInstantiate(self, graph, flags):
        return 0, "graph_exec"

    def cudaGraphLaunch(self, graph_exec, stream):
        self.log["replays"] = self.log.get("replays", 0) + 1
        self.log["captured_context"].execute_async_v3(stream)
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (0,)

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)
