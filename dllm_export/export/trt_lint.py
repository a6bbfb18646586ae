"""``check-trt``: walk an ONNX graph against TensorRT's ONNX parser support, on the CPU.

The rules are onnx-tensorrt's ``docs/operators.md`` for TensorRT 10.15 (opsets 9-24): which
operators parse at all, which element types each accepts, and the per-operator restrictions
(TopK K < 3840 and sorted, ScatterND without reduction, Q/DQ zero points of 0, constant
axes, ...). Every offending node is listed with the reason; only tensor metadata and small
constants are read, so a multi-gigabyte graph is checked in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from dllm_export.errors import DllmExportError

OPSET_RANGE = (9, 24)
TOPK_LIMIT = 3840

_F = {"FLOAT", "FLOAT16", "BFLOAT16"}
_FI = _F | {"INT32", "INT64"}
_FIB = _FI | {"BOOL"}
_TYPES: dict[str, set] = {}
for _ops, _types in (
    ("Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv "
     "ConvTranspose Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool "
     "GlobalLpPool GlobalMaxPool GroupNormalization GRU HardSigmoid HardSwish Hardmax "
     "ImageScaler InstanceNormalization IsInf LayerNormalization LeakyRelu Log LogSoftmax LRN "
     "LSTM LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus "
     "PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike "
     "Reciprocal Resize RMSNormalization RNN RotaryEmbedding Round ScaledTanh Scan Selu Sigmoid "
     "Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample", _F),
    ("Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less "
     "LessOrEqual Max Min Mod Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum "
     "ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu "
     "ReverseSequence Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK",
     _FI),
    ("Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot "
     "Reshape Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where", _FIB),
    ("And Or Not Xor", {"BOOL"}),
    ("Cast CastLike", _FIB | {"UINT8"}),
    ("Constant ConstantOfShape", _FIB | {"FLOAT8E4M3FN", "FLOAT4E2M1", "INT4"}),
    ("DequantizeLinear", {"INT8", "FLOAT8E4M3FN", "FLOAT4E2M1", "INT4"}),
    ("Attention", _F | {"INT8", "FLOAT8E4M3FN"}),
    ("Gelu", _FI | {"INT8"}),
    ("Mean", _FI | {"FLOAT8E4M3FN"}),
    ("TensorScatter", _F | {"INT32"}),
    ("NonZero NonMaxSuppression", {"FLOAT", "FLOAT16"}),
):
    for _op in _ops.split():
        _TYPES[_op] = _types
# Operators whose element-type rule applies to an input rather than the output.
_TYPE_FROM_INPUT = {"Equal": 0, "Greater": 0, "GreaterOrEqual": 0, "Less": 0, "LessOrEqual": 0,
                    "IsNaN": 0, "IsInf": 0, "ArgMax": 0, "ArgMin": 0, "TopK": 0, "Shape": 0,
                    "Size": 0, "NonZero": 0, "Cast": 0, "Where": 1, "DequantizeLinear": 0,
                    "QuantizeLinear": 0}
_CONSTANT_INPUT = {"CumSum": (1, "axis"), "OneHot": (1, "depth"), "TopK": (1, "K"),
                   "Squeeze": (1, "axes"), "Unsqueeze": (1, "axes")}


@dataclass
class Finding:
    severity: str  # "error": the parser rejects or miscomputes it; "warning": works with caveats
    node: str
    op: str
    reason: str


class _Graph:
    """Element types, constants and initializers of a model, for the rules below."""

    def __init__(self, model: onnx.ModelProto, directory: Path):
        self.directory = directory
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        self.types: dict[str, int] = {}
        for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            if value.type.HasField("tensor_type"):
                self.types[value.name] = value.type.tensor_type.elem_type
        self.initializers = {init.name: init for init in model.graph.initializer}
        for init in model.graph.initializer:
            self.types[init.name] = init.data_type
        self.constants = {}
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = attr.t
                        self.types[node.output[0]] = attr.t.data_type

    def type_name(self, value: str) -> str | None:
        code = self.types.get(value)
        return TensorProto.DataType.Name(code) if code else None

    def is_constant(self, value: str) -> bool:
        return value in self.initializers or value in self.constants

    def array(self, value: str) -> np.ndarray:
        tensor = self.initializers.get(value) or self.constants[value]
        return numpy_helper.to_array(tensor, base_dir=str(self.directory))


def _attr(node, name, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _node_rules(node, graph: _Graph) -> list[str]:
    """Restrictions beyond the element types, as reasons (empty when the node is fine)."""
    reasons = []
    op = node.op_type
    if op in _CONSTANT_INPUT:
        index, what = _CONSTANT_INPUT[op]
        if len(node.input) > index and node.input[index] and not graph.is_constant(node.input[index]):
            reasons.append(f"{what} must be a build-time constant")
    if op.startswith("Reduce") and len(node.input) > 1 and node.input[1] \
            and node.input[1] not in graph.initializers:
        reasons.append("axes must be an initializer")
    if op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            reasons.append("sorted must be 1")
        if graph.is_constant(node.input[1]) and int(graph.array(node.input[1]).max()) >= TOPK_LIMIT:
            reasons.append(f"K = {int(graph.array(node.input[1]).max())} must be < {TOPK_LIMIT}")
    if op in ("ScatterND", "ScatterElements") and _attr(node, "reduction", b"none") not in (b"none", "none"):
        reasons.append(f"reduction {_attr(node, 'reduction')!r} is not supported (only 'none')")
    if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
        if not graph.is_constant(node.input[2]) or np.any(graph.array(node.input[2]).astype(np.float32)):
            reasons.append("zero point must be 0 (TensorRT quantisation is symmetric)")
    if op == "Attention":
        if any(node.input[i] for i in range(4, len(node.input))):
            reasons.append("past_key / past_value / nonpad_kv_seqlen inputs are unsupported")
        if any(node.output[i] for i in range(1, len(node.output))):
            reasons.append("present_key / present_value / qk_matmul_output are unsupported")
        if _attr(node, "softcap", 0.0):
            reasons.append("softcap is unsupported")
    if op == "NonZero":
        reasons.append("data-dependent output shape: TensorRT cannot plan fixed buffers")
    return reasons


def _all_nodes(graph):
    """Every node, including those of If / Loop / Scan bodies (the parser reads those too)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                         attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else []):
                yield from _all_nodes(body)


def check_trt(onnx_path: str | Path) -> list[Finding]:
    """Every node TensorRT's ONNX parser would reject or restrict, with the reason."""
    onnx_path = Path(onnx_path)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends: not an ONNX file
        raise DllmExportError(
            f"{onnx_path}: not an ONNX model ({type(err).__name__}); pass a .onnx file or "
            "an artifact directory") from None
    graph = _Graph(model, onnx_path.parent)
    findings = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= opset.version <= OPSET_RANGE[1]:
            findings.append(Finding("error", "<model>", "opset",
                                    f"opset {opset.version} is outside TensorRT's {OPSET_RANGE}"))
    for index, node in enumerate(_all_nodes(model.graph)):
        name = node.name or f"#{index}"
        if node.domain not in ("", "ai.onnx"):
            findings.append(Finding("error", name, f"{node.domain}::{node.op_type}",
                                    "custom-domain op: TensorRT needs a plugin for it"))
            continue
        allowed = _TYPES.get(node.op_type)
        if allowed is None:
            findings.append(Finding("error", name, node.op_type,
                                    "not supported by TensorRT's ONNX parser"))
            continue
        which = _TYPE_FROM_INPUT.get(node.op_type)
        value = node.input[which] if which is not None else (node.output[0] if node.output else "")
        type_name = graph.type_name(value) if value else None
        if type_name == "DOUBLE":
            findings.append(Finding("warning", name, node.op_type,
                                    "DOUBLE tensors are cast down to FLOAT by TensorRT"))
        elif type_name and type_name not in allowed:
            findings.append(Finding("error", name, node.op_type,
                                    f"element type {type_name} is not supported "
                                    f"(allowed: {', '.join(sorted(allowed))})"))
        for reason in _node_rules(node, graph):
            severity = "warning" if reason.startswith("data-dependent") else "error"
            findings.append(Finding(severity, name, node.op_type, reason))
    return findings


def lint_artifact(directory: Path, manifest: dict) -> dict:
    """``check_trt`` over an artifact's canvas graph and every cached graph: the manifest's
    ``trt_compatibility`` (clean overall, clean per graph, every finding with its graph)."""
    from dataclasses import asdict

    files = {"canvas": manifest["graph"]["file"]}
    graphs = (manifest.get("cache") or {}).get("graphs") or {}
    files.update({name: spec["file"] for name, spec in graphs.items()})
    findings, clean = [], {}
    for name, file in files.items():
        found = check_trt(Path(directory) / file)
        clean[name] = not any(f.severity == "error" for f in found)
        findings += [{**asdict(f), "graph": name} for f in found]
    return {"clean": all(clean.values()), "graphs": clean, "findings": findings}
