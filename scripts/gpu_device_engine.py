"""A stand-in ``tensorrt`` whose execution context does real work on the GPU, for the GPU
suite on a machine without TensorRT (cupy and cuda-bindings only).

The engine has the decode head's I/O (``input_ids``, ``attention_mask`` in;
``topk_ids``, ``topk_logprobs``, ``neg_entropy``, ``special_logprobs`` out, batch reported
as -1 like a dynamic-batch engine). ``execute_async_v3(stream)`` launches one CUDA kernel on
that stream, through cupy, over the buffers at the addresses the backend bound: the logits
of a row are a fixed random table's row for its token, and the kernel computes their
log-softmax, top-k, negative entropy (times the mask) and the special tokens' log-probs.
So the TensorRT backend's own loop (device buffers, async copies on its stream, CUDA-graph
capture after the first launch and replay after that) is checked against a numpy reference
of the same head. Every bound address must be device memory and the stream a real one.
"""

from __future__ import annotations

import enum
import types

import numpy as np

DataType = enum.IntEnum("DataType", dict(FLOAT=0, HALF=1, INT8=2, INT32=3, BOOL=4, UINT8=5,
                                         FP8=6, BF16=7, INT64=8, INT4=9, FP4=10, E8M0=11))
TensorIOMode = enum.IntEnum("TensorIOMode", dict(NONE=0, INPUT=1, OUTPUT=2))
MAGIC = b"DEVICE-DECODE-HEAD"

KERNEL = r"""
extern "C" __global__ void decode_head(
    const long long* ids, const long long* mask, const float* table, const int* specials,
    int rows, int vocab, int topk, int nspecial, long long* topk_ids, float* topk_logprobs,
    float* neg_entropy, float* special_logprobs) {
  int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const float* logits = table + ids[row] * vocab;
  float top = -1e30f;
  for (int v = 0; v < vocab; ++v) top = fmaxf(top, logits[v]);
  float total = 0.f;
  for (int v = 0; v < vocab; ++v) total += expf(logits[v] - top);
  float lse = top + logf(total), entropy = 0.f;
  for (int v = 0; v < vocab; ++v) { float lp = logits[v] - lse; entropy += expf(lp) * lp; }
  neg_entropy[row] = entropy * (float)mask[row];
  for (int k = 0; k < topk; ++k) {  // selection: k is small
    int best = -1; float value = -1e30f;
    for (int v = 0; v < vocab; ++v) {
      bool taken = false;
      for (int j = 0; j < k; ++j) taken = taken || topk_ids[row * topk + j] == v;
      if (!taken && logits[v] > value) { value = logits[v]; best = v; }
    }
    topk_ids[row * topk + k] = best;
    topk_logprobs[row * topk + k] = value - lse;
  }
  for (int s = 0; s < nspecial; ++s)
    special_logprobs[row * nspecial + s] = logits[specials[s]] - lse;
}
"""


def reference(table: np.ndarray, ids, mask, topk: int, specials) -> dict:
    """The same decode head in numpy (float64 log-softmax)."""
    logits = table[ids].astype(np.float64)
    logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :topk]
    return {"topk_ids": order,
            "topk_logprobs": np.take_along_axis(logprobs, order, -1),
            "neg_entropy": (np.exp(logprobs) * logprobs).sum(-1) * mask,
            "special_logprobs": logprobs[..., list(specials)]}


class Engine:
    def __init__(self, log, batch, length, vocab, topk, specials, seed=0):
        import cupy

        self.log, self.cupy = log, cupy
        self.batch, self.length, self.vocab = batch, length, vocab
        self.topk, self.specials = topk, tuple(specials)
        self.table = np.random.default_rng(seed).standard_normal((vocab, vocab)).astype(
            np.float32)
        self.tensors = {"input_ids": ((batch, length), DataType.INT64, np.int64),
                        "attention_mask": ((batch, length), DataType.INT64, np.int64),
                        "topk_ids": ((batch, length, topk), DataType.INT64, np.int64),
                        "topk_logprobs": ((batch, length, topk), DataType.FLOAT, np.float32),
                        "neg_entropy": ((batch, length), DataType.FLOAT, np.float32),
                        "special_logprobs": ((batch, length, len(self.specials)),
                                             DataType.FLOAT, np.float32)}
        self.names, self.inputs = list(self.tensors), ["input_ids", "attention_mask"]

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_shape(self, name):
        return (-1, *self.tensors[name][0][1:])

    def get_tensor_profile_shape(self, name, index):
        return [self.tensors[name][0]] * 3

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]

    def create_execution_context(self):
        self.log["context"] = Context(self)
        return self.log["context"]


class Context:
    def __init__(self, engine: Engine):
        cupy = engine.cupy
        self.engine, self.cupy, self.addresses, self.shapes, self.views = engine, cupy, {}, {}, {}
        # everything the kernel reads is on the device before any capture (no allocation
        # may happen while a CUDA graph is being recorded)
        self.table = cupy.asarray(engine.table)
        self.specials = cupy.asarray(np.array(engine.specials, np.int32))
        self.kernel = cupy.RawKernel(KERNEL, "decode_head")

    def set_input_shape(self, name, shape):
        if tuple(shape) != self.engine.tensors[name][0]:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if set(self.shapes) == set(self.engine.inputs):
            return self.engine.tensors[name][0]
        return self.engine.get_tensor_shape(name)

    def set_tensor_address(self, name, pointer):
        cupy = self.cupy
        if type(pointer) is not int:
            raise TypeError(f"set_tensor_address(): {name}: an int address, got {pointer!r}")
        kind = cupy.cuda.runtime.pointerGetAttributes(pointer).type
        if kind != getattr(cupy.cuda.runtime, "memoryTypeDevice", 2):  # cudaMemoryTypeDevice
            raise ValueError(f"{name}: address {pointer:#x} is not device memory ({kind})")
        shape, _, dtype = self.engine.tensors[name]
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        memory = cupy.cuda.UnownedMemory(pointer, nbytes, self)
        self.views[name] = cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream_handle):
        cupy, engine, log = self.cupy, self.engine, self.engine.log
        if type(stream_handle) is not int:  # TensorRT's binding takes a size_t
            raise TypeError("execute_async_v3(): incompatible function arguments; "
                            f"stream_handle: int, got {type(stream_handle).__name__}")
        if stream_handle == 0 or set(self.shapes) != set(engine.inputs):
            return False
        log["launches"] = log.get("launches", 0) + 1
        log.setdefault("streams", set()).add(stream_handle)
        rows = engine.batch * engine.length
        v = self.views
        with cupy.cuda.ExternalStream(stream_handle):
            self.kernel(((rows + 127) // 128,), (128,), (
                v["input_ids"], v["attention_mask"], self.table, self.specials,
                np.int32(rows), np.int32(engine.vocab), np.int32(engine.topk),
                np.int32(len(engine.specials)), v["topk_ids"], v["topk_logprobs"],
                v["neg_entropy"], v["special_logprobs"]))
        return True


def make_tensorrt(log: dict, **engine):
    """A ``tensorrt`` module whose Runtime deserialises ``MAGIC`` into the device engine."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "0.0.0-device-stand-in"
    trt.DataType, trt.TensorIOMode = DataType, TensorIOMode

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            if bytes(blob) != MAGIC:
                return None
            log["engine"] = Engine(log, **engine)
            return log["engine"]

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt
