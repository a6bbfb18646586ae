"""Post-export passes over the exported graph (onnx_ir), one function each, run in order.

1. ``name_by_module``: nodes become ``<module path>/<op>`` and the weights they consume
   ``<module path>.weight_t`` instead of ``node_linear_3`` / ``val_123``, so quantisation
   exclusions (``*mlp.gate*``, ``*lm_head*``) and reports speak in checkpoint names.
2. ``skip_unpadded_mask``: in a canvas graph whose attention runs as ONNX Runtime's
   ``MultiHeadAttention`` with a ``key_padding_mask``, each such node becomes an ``If`` on
   "no key is padding" (``ReduceMin(attention_mask) > 0``, computed once): then the node
   runs without the mask (the kernel's unmasked fast path), else exactly as exported.
3. ``divide_by_norm``: ``x * Reciprocal(Sqrt(v))`` (how ``torch.rsqrt`` exports) becomes
   ``x / Sqrt(v)``, the form of RMSNorm ONNX Runtime fuses into one
   ``SimplifiedLayerNormalization`` (the same value to one rounding).
4. ``strip_torch_metadata``: drop the exporter's per-node stack traces and FX dumps (they
   carry absolute source paths and outweigh a small graph).
"""

from __future__ import annotations

import re

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
GENERIC_NAME = re.compile(r"^(val|_val)_\d+$")


def module_path(node) -> str:
    """The innermost PyTorch module path of a node, without the Denoiser's leading 'model.'
    (so 'model.layers.0.mlp.gate', like the checkpoint's tensor names)."""
    scopes = re.findall(r"'([^']*)'", node.metadata_props.get(SCOPES_KEY, ""))
    modules = [s for s in scopes if s.startswith("model.")]
    return modules[-1][len("model."):] if modules else ""


def name_by_module(model) -> None:
    graph = model.graph
    seen: dict[str, int] = {}
    taken = set(graph.initializers)
    for node in graph:
        path = module_path(node)
        if not path:
            continue
        base = f"{path}/{node.op_type}"
        seen[base] = seen.get(base, 0) + 1
        node.name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if (weight is None or not weight.is_initializer() or not GENERIC_NAME.match(weight.name)
                or len(weight.uses()) != 1):
            continue
        new = f"{path}.weight_t"
        if new not in taken:
            taken.add(new)
            weight.name = new


KEY_PADDING_INPUT = 4  # MultiHeadAttention's key_padding_mask


def _padding_masked_attention(graph) -> list:
    return [node for node in graph
            if node.domain == "com.microsoft" and node.op_type == "MultiHeadAttention"
            and len(node.inputs) > KEY_PADDING_INPUT
            and node.inputs[KEY_PADDING_INPUT] is not None]


def skip_unpadded_mask(model) -> None:
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == "attention_mask"
                 and v.shape is not None and len(v.shape) == 2), None)
    nodes = _padding_masked_attention(graph) if mask is not None else []
    if not nodes:
        return
    zero = ir.Value(name="attention_mask.zero", const_value=ir.tensor(np.array(0, np.int64)))
    graph.register_initializer(zero)
    lowest = ir.Node("", "ReduceMin", [mask], [ir.AttrInt64("keepdims", 0)],
                     name="attention_mask/ReduceMin")
    unpadded = ir.Node("", "Greater", [lowest.outputs[0], zero], name="attention_mask/Greater")
    unpadded.outputs[0].name = "attention_mask.unpadded"
    graph.insert_before(nodes[0], [lowest, unpadded])
    for node in nodes:
        out = node.outputs[0]
        plain = ir.Node(node.domain, node.op_type, node.inputs[:3], node.attributes.values(),
                        name=f"{node.name}_unmasked")
        plain.outputs[0].name = f"{out.name}_unmasked"
        branch = ir.Node("", "If", [unpadded.outputs[0]], name=f"{node.name}_if", num_outputs=1)
        for value in (plain.outputs[0], branch.outputs[0]):
            value.shape, value.type = out.shape, out.type
        result = branch.outputs[0]
        ir.convenience.replace_all_uses_with(out, result)
        name = out.name
        out.name = f"{name}_masked"
        result.name = name
        graph.insert_before(node, branch)
        graph.remove(node)
        branch.attributes["then_branch"] = ir.AttrGraph(
            "then_branch", ir.Graph([], [plain.outputs[0]], nodes=[plain], name="unpadded"))
        branch.attributes["else_branch"] = ir.AttrGraph(
            "else_branch", ir.Graph([], [out], nodes=[node], name="padded"))


def unwrap_unpadded_mask(model) -> None:
    """Undo ``skip_unpadded_mask`` on an ``onnx.ModelProto``: each ``If`` becomes its masked
    branch (exact for every canvas). For quantisers: ONNX Runtime 1.32's
    QDQPropagationTransformer aborts the process on a DequantizeLinear whose value reaches
    an If body (an implicit input), so Q/DQ graphs keep attention outside control flow."""
    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.op_type == "If" and node.name.endswith("_if"):
            (masked,) = next(a.g for a in node.attribute if a.name == "else_branch").node
            masked.output[0] = node.output[0]
            nodes.append(masked)
        elif node.name not in ("attention_mask/ReduceMin", "attention_mask/Greater"):
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [i for i in graph.initializer if i.name != "attention_mask.zero"]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def divide_by_norm(model) -> None:
    import onnx_ir as ir

    graph = model.graph
    for reciprocal in [n for n in graph if n.op_type == "Reciprocal" and n.domain == ""]:
        root = reciprocal.inputs[0].producer()
        uses = [node for node, _ in reciprocal.outputs[0].uses()]
        if (root is None or root.op_type != "Sqrt" or not uses
                or any(n.op_type != "Mul" or n.inputs[0] is n.inputs[1] for n in uses)):
            continue
        for mul in uses:
            other = mul.inputs[1] if mul.inputs[0] is reciprocal.outputs[0] else mul.inputs[0]
            div = ir.Node("", "Div", [other, root.outputs[0]],
                          name=mul.name.replace("/Mul", "/Div", 1) if mul.name else None)
            div.outputs[0].shape, div.outputs[0].type = mul.outputs[0].shape, mul.outputs[0].type
            graph.insert_before(mul, div)
            ir.convenience.replace_all_uses_with(mul.outputs[0], div.outputs[0])
            name = mul.outputs[0].name
            graph.remove(mul)
            div.outputs[0].name = name  # a graph output keeps its name
        graph.remove(reciprocal)


def strip_torch_metadata(model) -> None:
    for node in model.graph.all_nodes():
        for key in [k for k in node.metadata_props if k.startswith("pkg.torch") or k == "namespace"]:
            del node.metadata_props[key]


PASSES = (name_by_module, skip_unpadded_mask, divide_by_norm, strip_torch_metadata)


def run_passes(model) -> None:
    for apply in PASSES:
        apply(model)


def write_logits_graph(src, dst) -> None:
    """Copy a decode-head graph with the full logits as an extra output ``logits``.

    Only the graph proto is copied; both files read the same external weights file. Eval and
    calibration (ELBO, logit parity) load this one; engines are built from the other, which
    does not pay for a [B, L, V] output.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    head = [n for n in model.graph.node if n.op_type == "LogSoftmax"]
    if not head:
        raise ValueError(f"{src}: no decode head (LogSoftmax) found")
    # the head runs over chunks of rows (models/head.py): each chunk's LogSoftmax reads a
    # Slice of the canvas' logits (a float Cast may sit on either side of it)
    producers = {out: node for node in model.graph.node for out in node.output}
    logits, cast, sliced = head[0].input[0], False, False
    while (node := producers.get(logits)) is not None and (
            node.op_type == "Cast" or (node.op_type == "Slice" and not sliced)):
        cast |= node.op_type == "Cast"
        sliced |= node.op_type == "Slice"
        logits = node.input[0]
    if not sliced:
        logits, cast = head[-1].input[0], False
    model.graph.node.append(
        helper.make_node("Cast", [logits], ["logits"], name="logits_output",
                         to=onnx.TensorProto.FLOAT) if cast else
        helper.make_node("Identity", [logits], ["logits"], name="logits_output"))
    model.graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(dst))
