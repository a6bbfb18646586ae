"""The cast pass for strongly typed TensorRT (11.x, TensorRT for RTX): an fp32 artifact's
graph computing in fp16 or bf16, with fp32 kept where the numerics need it.

TensorRT 11 removed the FP16/BF16 builder flags: a network computes in the types its graph
carries. ``build`` of an fp32 artifact for a 16-bit profile therefore writes a cast copy of
each graph and builds that. fp32 stays for

- normalisation: nodes in a module whose name contains ``norm`` and the normalisation ops;
- ``Softmax`` and ``LogSoftmax`` (attention probabilities, the MoE router's weights);
- the MoE router: the ``gate`` / ``router`` module's projection;
- the decode head: every node downstream of the last MatMul/Gemm (the LM head), so the
  log-softmax, top-k, entropy and special-token scores are computed from fp32 logits;
- the graph's inputs and outputs, so the engine's I/O is the artifact's.

The conversion is onnxruntime's ``onnxruntime.transformers.float16`` (its maintained copy of
onnxconverter-common's converter) with those block lists; onnx_ir sorts the nodes it appends.
For bf16 the fp16 graph is retyped and its initializers are converted again from the
original fp32 values (so nothing is clipped to fp16's range).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dllm_export.errors import DllmExportError

KEEP_OPS = ["Softmax", "LogSoftmax", "LayerNormalization", "RMSNormalization",
            "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"]
KEEP_MODULES = re.compile(r"norm|(^|[./])(gate|router)(/|$)", re.IGNORECASE)
KEPT = ("norms", "softmax", "router", "decode head", "graph inputs and outputs")
TOOL = "onnxruntime.transformers.float16 + onnx_ir topological sort"


def decode_head_nodes(nodes) -> list[str]:
    """Names of the nodes downstream of the last MatMul/Gemm (the LM head)."""
    heads = [i for i, node in enumerate(nodes) if node.op_type in ("MatMul", "Gemm")]
    if not heads:
        return []
    reached, names = set(nodes[heads[-1]].output), []
    for node in nodes[heads[-1] + 1:]:
        if reached & set(node.input):
            reached |= set(node.output)
            names.append(node.name)
    return names


def kept_nodes(graph) -> list[str]:
    """Names of the nodes that keep computing in fp32 (see the module docstring)."""
    named = [node.name for node in graph.node if KEEP_MODULES.search(node.name or "")]
    return sorted(set(named) | set(decode_head_nodes(graph.node)))


def _load(source: Path, scratch: Path):
    """The graph with shapes and types inferred (infer_shapes_path works past 2 GiB)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    inferred = scratch / f"{source.stem}.inferred.onnx"
    try:
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
        load_external_data_for_model(model, str(source.parent))
    except Exception as err:  # onnx raises its own DecodeError / InferenceError types
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DllmExportError(f"{source}: the cast pass cannot read this graph ({first}); "
                              "re-export the artifact") from None
    finally:
        inferred.unlink(missing_ok=True)
    return model


def _retype_bf16(model, originals: dict) -> None:
    """float16 -> bfloat16 everywhere the fp16 pass put it (values, initializers, Cast,
    Constant); initializers from the original fp32 values."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, numpy_helper

    def bf16_tensor(tensor):
        values = originals.get(tensor.name)
        if values is None:
            values = numpy_helper.to_array(tensor).astype(np.float32)
        new = numpy_helper.from_array(values.astype(ml_dtypes.bfloat16), tensor.name)
        tensor.CopyFrom(new)

    graph = model.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT16:
            bf16_tensor(tensor)
    for value in (*graph.value_info, *graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    casts = []
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and \
                    attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.BFLOAT16
            if attribute.type != onnx.AttributeProto.TENSOR or \
                    attribute.t.data_type != TensorProto.FLOAT16:
                continue
            if node.op_type == "ConstantOfShape":  # bfloat16 output only from opset 20
                value = numpy_helper.to_array(attribute.t).astype(np.float32)
                attribute.t.CopyFrom(numpy_helper.from_array(value, attribute.t.name))
                wanted, node.output[0] = node.output[0], f"{node.output[0]}_fp32"
                casts.append(onnx.helper.make_node("Cast", [node.output[0]], [wanted],
                                                   name=f"{node.name}_to_bf16",
                                                   to=TensorProto.BFLOAT16))
            else:
                bf16_tensor(attribute.t)
    graph.node.extend(casts)  # placed by the topological sort that follows


def cast_graph(source: Path, target: Path, precision: str) -> dict:
    """Write ``target`` (and ``target``.data): ``source`` computing in ``precision``.

    Args:
        source: an fp32 ONNX graph (external data beside it).
        target: where to write the cast graph; its weights go to ``<target name>.data``.
        precision: "fp16" or "bf16".
    Returns:
        What was done, for the engine manifest (tool, precision, kept node count, kept).
    """
    import onnx
    import onnx_ir
    from onnx import TensorProto, numpy_helper
    from onnx_ir.passes.common import TopologicalSortPass
    from onnxruntime.transformers import float16

    if precision not in ("fp16", "bf16"):
        raise DllmExportError(f"cast pass: precision {precision!r} is not fp16 or bf16")
    model = _load(Path(source), Path(target).parent)
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                 if t.data_type == TensorProto.FLOAT} if precision == "bf16" else {}
    keep = kept_nodes(model.graph)
    # The exporter also lists initializers in value_info; the converter retypes those
    # entries even for initializers it keeps in fp32, which breaks type inference: drop them.
    weights = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(values)
    model = float16.convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True,
        op_block_list=float16.DEFAULT_OP_BLOCK_LIST + KEEP_OPS, node_block_list=keep)
    if precision == "bf16":
        _retype_bf16(model, originals)
    sorted_model = onnx_ir.from_proto(model)
    TopologicalSortPass()(sorted_model)
    model = onnx_ir.to_proto(sorted_model)
    onnx.save(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{Path(target).name}.data", size_threshold=1024)
    low = TensorProto.BFLOAT16 if precision == "bf16" else TensorProto.FLOAT16
    converted = sum(1 for t in model.graph.initializer if t.data_type == low)
    return {"how": "cast pass", "tool": TOOL, "precision": precision,
            "kept_fp32": list(KEPT), "kept_fp32_nodes": len(keep),
            "converted_initializers": converted}
