"""Q/DQ graphs laid out so that ONNX Runtime CPU runs every quantised MatMul in integers.

``onnxruntime.quantization`` writes one activation ``QuantizeLinear -> DequantizeLinear``
pair per tensor, shared by all its readers. ONNX Runtime's graph optimiser fuses a
``DequantizeLinear -> MatMul (-> QuantizeLinear)`` group into ``QLinearMatMul`` (or
``MatMulIntegerToFloat``) only when each DequantizeLinear feeds that one MatMul, so q/k/v
and gate/up behind one pair stayed float MatMuls that dequantised their weights every step
(16 of 56 linear layers fused in a LLaDA). Two rewrites fix that (``calibration/kernels.py``
counts the result, and ``quantize`` records it):

* ``dedicate_activation_qdq``: each MatMul reading a shared pair gets its own, with its own
  scale and zero-point initialisers: copies reading the same initialisers are identical
  nodes, which ONNX Runtime's common-subexpression elimination merges back into one.
* ``drop_unfusable_output_qdq``: a MatMul's output pair whose DequantizeLinear feeds
  several non-MatMul readers (LLaDA's gate projection into SiLU's Sigmoid and Mul) kept
  that MatMul unfused with int8 activations in onnxruntime 1.32; without the pair it runs
  as ``MatMulIntegerToFloat`` and its readers get the (more precise) float output.

Both keep the graph symmetric int8 Q/DQ, so TensorRT still parses it.
"""

from __future__ import annotations

from pathlib import Path


def _consumers(graph) -> dict[str, list]:
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _renamed(tensor, name: str):
    copy = type(tensor)()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def _rewire(node, old: str, new: str) -> None:
    for slot, name in enumerate(node.input):
        if name == old:
            node.input[slot] = new


def dedicate_activation_qdq(model) -> int:
    """Give every MatMul reading a shared activation Q/DQ pair its own pair and its own
    scale and zero-point initialisers, in place. Returns how many pairs were added."""
    from onnx import helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    added, ordered = 0, []
    for node in graph.node:
        ordered.append(node)
        quant = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quant is None or quant.op_type != "QuantizeLinear":
            continue
        if quant.input[0] in initializers:  # a weight's pair has one reader
            continue
        readers = consumers.get(node.output[0], [])
        # Only MatMuls fuse; other readers keep sharing the original pair.
        matmuls = [reader for reader in readers if reader.op_type == "MatMul"]
        if len(matmuls) == len(readers):
            matmuls = matmuls[1:]
        for reader in matmuls:
            added += 1
            params = []
            for name in quant.input[1:]:
                graph.initializer.append(_renamed(initializers[name], f"{name}_{added}"))
                params.append(f"{name}_{added}")
            quantized = f"{quant.output[0]}_{added}"
            dequantized = f"{node.output[0]}_{added}"
            ordered.append(helper.make_node(
                "QuantizeLinear", [quant.input[0], *params], [quantized],
                name=f"{quant.name}_{added}", domain=quant.domain))
            ordered[-1].attribute.extend(quant.attribute)
            ordered.append(helper.make_node(
                "DequantizeLinear", [quantized, *params], [dequantized],
                name=f"{node.name}_{added}", domain=node.domain))
            ordered[-1].attribute.extend(node.attribute)
            _rewire(reader, node.output[0], dequantized)
    del graph.node[:]
    graph.node.extend(ordered)
    return added


def drop_unfusable_output_qdq(model) -> int:
    """Remove the output Q/DQ pair of a quantised MatMul when its DequantizeLinear feeds
    more than one reader and none of them is a MatMul; in place. Returns pairs removed."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    outputs = {value.name for value in graph.output}
    dropped: set[str] = set()
    for node in graph.node:
        weight = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or weight.op_type != "DequantizeLinear":
            continue
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        quant = after[0]
        dequants = consumers.get(quant.output[0], [])
        if len(dequants) != 1 or dequants[0].op_type != "DequantizeLinear":
            continue
        readers = consumers.get(dequants[0].output[0], [])
        if (len(readers) < 2 or any(r.op_type == "MatMul" for r in readers)
                or dequants[0].output[0] in outputs):
            continue
        for reader in readers:
            _rewire(reader, dequants[0].output[0], node.output[0])
        dropped |= {quant.name, dequants[0].name}
    kept = [node for node in graph.node if node.name not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return len(dropped) // 2


def prepare_for_fusion(graph: Path) -> dict:
    """Both rewrites on a saved Q/DQ graph. Its weights file is left as it is: the new
    initialisers are scalars, stored in the graph itself."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    counts = {"dedicated_pairs": dedicate_activation_qdq(model),
              "dropped_output_pairs": drop_unfusable_output_qdq(model)}
    if any(counts.values()):
        onnx.save_model(model, str(graph))
    return counts
