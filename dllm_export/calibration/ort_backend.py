"""ONNX Runtime's quantisation tools (``onnxruntime.quantization``), in this environment.

* ``int8_qdq``: static INT8 in the Q/DQ format, weights per output channel, activations per
  tensor, both symmetric (every zero point is 0), so the same graph runs on ONNX Runtime
  and parses in TensorRT (which accepts symmetric quantisation only). Activation ranges come
  from the calibration states with MinMax, Entropy or Percentile.
* ``weight_only_nbits``: INT4 or INT8 weights in ``com.microsoft::MatMulNBits`` blocks
  (round-to-nearest, symmetric, block 32): ONNX Runtime only, no calibration needed.

Both want linear layers as ``MatMul`` with 2-D weights: ``prepare_graph`` first rewrites the
exporter's ``Gemm`` nodes (transposed weights, optional bias) into ``MatMul`` (+ ``Add``);
MatMulNBits does not take Gemm at all.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from dllm_export.calibration.clock import ForwardClock
from dllm_export.calibration.qdq_fusion import prepare_for_fusion
from dllm_export.calibration.states import CanvasState, batched

INT8_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
NBITS_BLOCK = 32
# MatMulNBits' accuracy_level when no device profile names one: int8 arithmetic (ONNX
# Runtime's own recommendation for CPUs with integer dot products).
NBITS_ACCURACY_LEVEL = 4
# The calibrators keep every calibrated tensor of every batch they are given; feeding them a
# few batches at a time (CalibStridedMinMax, which merges ranges and histograms between
# strides) keeps a large model's calibration within memory. (CalibMaxIntermediateOutputs
# is no help: in onnxruntime 1.32 it drops the collected data without using it.)
STRIDE = 4


def _attr(node, name, default):
    for attr in node.attribute:
        if attr.name == name:
            return attr.f if attr.type == attr.FLOAT else attr.i
    return default


def gemm_to_matmul(model) -> int:
    """Rewrite weight-bearing ``Gemm`` nodes as ``MatMul`` (+ ``Add`` for a bias), in place.

    Node ``<path>/Gemm`` becomes ``<path>/MatMul``; a transposed weight is stored transposed
    so the MatMul weight is ``[in, out]``. Returns how many nodes were rewritten.
    """
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    names = {n.name for n in model.graph.node}
    rewritten = []
    for node in model.graph.node:
        if (
            node.op_type != "Gemm"
            or node.input[1] not in initializers
            or _attr(node, "transA", 0)
            or _attr(node, "alpha", 1.0) != 1.0
            or _attr(node, "beta", 1.0) != 1.0
        ):
            rewritten.append(node)
            continue
        weight = initializers[node.input[1]]
        if _attr(node, "transB", 0):
            array = np.ascontiguousarray(numpy_helper.to_array(weight).T)
            weight.CopyFrom(numpy_helper.from_array(array, weight.name))
        base = node.name.rsplit("/", 1)[0]
        name = (
            f"{base}/MatMul" if f"{base}/MatMul" not in names else f"{node.name}/MatMul"
        )
        has_bias = len(node.input) > 2 and node.input[2]
        out = node.output[0] + "_matmul" if has_bias else node.output[0]
        rewritten.append(
            helper.make_node("MatMul", [node.input[0], node.input[1]], [out], name=name)
        )
        if has_bias:
            rewritten.append(
                helper.make_node(
                    "Add",
                    [out, node.input[2]],
                    [node.output[0]],
                    name=f"{base}/Add_bias",
                )
            )
    count = sum(n.op_type == "Gemm" for n in model.graph.node) - sum(
        n.op_type == "Gemm" for n in rewritten
    )
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    # Recorded shapes of transposed weights are stale; shape inference redoes them all.
    del model.graph.value_info[:]
    return count


def prepare_graph(src: Path, dst: Path) -> None:
    """Copy ``src`` (with its weights) to ``dst`` with Gemm rewritten as MatMul."""
    import onnx

    from dllm_export.export.passes import unwrap_unpadded_mask

    model = onnx.load(str(src), load_external_data=True)
    gemm_to_matmul(model)
    unwrap_unpadded_mask(model)  # Q/DQ next to an If aborts ONNX Runtime 1.32
    save_model(model, dst)


def save_model(model, path: Path) -> None:
    """Save with every weight in ``<name>.data`` beside the graph."""
    import onnx

    path = Path(path)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


class FeedsReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over ready input feeds (one dict
    of input name -> array per calibration batch)."""

    def __init__(self, feeds: list[dict], progress=None):
        self.batches = list(feeds)
        self.index, self.end = 0, len(self.batches)
        # One forward of the calibration graph per batch; ticked when the next is asked for.
        self.clock = ForwardClock(len(self.batches), progress, stage="calibrate")
        self.pending = False

    def __len__(self):
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int):
        """The strided calibration reads the batches a few at a time."""
        self.index, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self):
        if self.pending:
            self.clock.tick("ONNX Runtime collecting activation ranges")
            self.pending = False
        if self.index >= self.end:
            return None
        feeds = self.batches[self.index]
        self.index += 1
        self.pending = True
        return feeds


class StatesReader(FeedsReader):
    """Canvas-graph feeds from calibration states, in the artifact's fixed batch."""

    def __init__(self, states: list[CanvasState], batch: int, progress=None):
        super().__init__([{"input_ids": ids, "attention_mask": attention}
                          for ids, attention in batched(states, batch)], progress)


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs every node at INFO and prints advice; keep it off the
    progress line."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            yield
        finally:
            root.setLevel(level)


def int8_qdq(
    prepared: Path,
    out: Path,
    nodes: list[str],
    states: list[CanvasState],
    batch: int,
    method: str = "minmax",
    progress=None,
    reader=None,
) -> None:
    """Static INT8 Q/DQ of ``nodes`` (per-channel symmetric weights, symmetric activations).

    Args:
        prepared: the float graph after ``prepare_graph``.
        out: the graph to write (weights in ``out.name + '.data'``).
        nodes: node names to quantise (``recipes.select_nodes``).
        states: calibration states.
        batch: the artifact's fixed batch.
        method: "minmax", "entropy" or "percentile".
        reader: a ``FeedsReader`` to calibrate on instead of ``states`` (the cached graphs).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader = reader or StatesReader(states, batch, progress)
    stride = max(d for d in range(1, STRIDE + 1) if len(reader) % d == 0)
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "CalibStridedMinMax": stride,
    }
    with _quiet():
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=not cpu_has_vnni(),
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            use_external_data_format=True,
            calibrate_method=getattr(CalibrationMethod, INT8_METHODS[method]),
            extra_options=extra,
        )
    prepare_for_fusion(out)


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX). Without it ONNX
    Runtime's int8 kernels add u8 x s8 pairs in 16 bits (vpmaddubsw), which saturates with
    full-range weights: ONNX Runtime's documented fix is 7-bit weights (``reduce_range``).
    Non-x86 CPUs (ARM's sdot) and unreadable /proc report True."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    if "flags" not in flags:  # not x86
        return True
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def weight_only_nbits(
    prepared: Path,
    out: Path,
    nodes: list[str],
    bits: int,
    block_size: int = NBITS_BLOCK,
    accuracy_level: int = NBITS_ACCURACY_LEVEL,
    dequantize_blocks: bool = False,
) -> None:
    """``MatMulNBits`` (round-to-nearest, symmetric) for ``nodes``; other MatMuls stay.

    ``accuracy_level`` is the lowest precision ONNX Runtime may compute in: 0 dequantises
    the weights and multiplies in float32, 4 quantises activations to int8 per block and
    multiplies in integers. Which is faster depends on the CPU (device profiles say).
    ``dequantize_blocks``: the same weights as INT4 ``DequantizeLinear`` blocks (opset 21,
    ``block_size`` along the input dimension) feeding a standard MatMul, which TensorRT
    parses as weight-only INT4 and ONNX Runtime runs too.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(prepared), load_external_data=True)
    others = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and n.name not in nodes
    ]
    with _quiet():
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=accuracy_level,
            nodes_to_exclude=others,
            nodes_to_include=nodes,
            quant_format=QuantFormat.QDQ if dequantize_blocks else QuantFormat.QOperator,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    save_model(quantizer.model.model, out)
