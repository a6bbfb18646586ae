"""``com.microsoft::MoE`` -> ``QMoE``: INT8 or INT4 expert weights for ``--moe ort`` artifacts.

The exporter's MoE node takes fc1 ``[E, 2I, D]`` (gate/up interleaved) and fc2 ``[E, D, I]``
in nn.Linear layout, computed by a ``Transpose`` of the packed weights. Here each expert
matrix is quantised per output row, symmetric round-to-nearest, and stored the way the
onnxruntime 1.32 CPU kernel reads it: unsigned with an offset (128 for 8 bits, 8 for 4 bits,
two 4-bit values per byte, low nibble first) and float scales ``[E, N]``. Routing stays
float (the node takes the router logits). No calibration: weights only.

That CPU kernel always renormalises the top-k routing weights to sum to 1, whatever
``normalize_routing_weights`` says (measured: tests/test_calibration.py). For a router that
does not (LLaDA-MoE: softmax over every expert, the top k kept as they are) the QMoE output
is multiplied by the top-k probabilities' sum, which is exactly the unnormalised mix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def quantize_rows(weights: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric quantisation of ``[E, N, K]``: (uint8 codes, float32 scales [E, N])."""
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(weights).max(axis=-1) / qmax
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
    codes = np.clip(np.rint(weights / scales[..., None]), -qmax - 1, qmax)
    codes = (codes + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(codes), scales


def _resolve(name, initializers, producers, weights_dir: Path):
    """The constant array behind ``name``: an initializer, or a Transpose of one."""
    from onnx import helper, numpy_helper

    if name in initializers:
        return numpy_helper.to_array(
            initializers[name], base_dir=str(weights_dir)
        ), None
    node = producers[name]
    if node.op_type != "Transpose" or node.input[0] not in initializers:
        raise ValueError(f"{name}: expert weights are not a constant")
    perm = next(
        helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"
    )
    source = numpy_helper.to_array(
        initializers[node.input[0]], base_dir=str(weights_dir)
    )
    return np.transpose(source, perm), node


def _topk_mass(node, k: int, graph) -> tuple[list, str]:
    """Nodes computing the sum of the top-k softmax probabilities of ``node``'s router
    logits, [T, 1], and its name."""
    from onnx import helper, numpy_helper

    base = node.name or node.output[0]
    k_name, axes_name = f"{base}.topk_k", f"{base}.topk_axes"
    graph.initializer.extend([numpy_helper.from_array(np.array([k], np.int64), k_name),
                              numpy_helper.from_array(np.array([-1], np.int64), axes_name)])
    names = [f"{base}.router_probs", f"{base}.topk_probs", f"{base}.topk_ids",
             f"{base}.topk_mass"]
    nodes = [
        helper.make_node("Softmax", [node.input[1]], [names[0]], axis=-1,
                         name=f"{base}/RouterSoftmax"),
        helper.make_node("TopK", [names[0], k_name], names[1:3], axis=-1,
                         name=f"{base}/RouterTopK"),
        helper.make_node("ReduceSum", [names[1], axes_name], [names[3]], keepdims=1,
                         name=f"{base}/RouterTopKMass"),
    ]
    return nodes, names[3]


def moe_to_qmoe(model, bits: int, weights_dir: Path) -> int:
    """Replace every ``MoE`` node of ``model`` (weights loaded or in ``weights_dir``) by
    ``QMoE``, in place; returns how many. Float expert weights are dropped."""
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:  # ReduceSum's axes as an input
        raise ValueError(f"QMoE conversion needs opset 13 or later, not {opset}")
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    replaced, dead, nodes = 0, [], []
    for node in graph.node:
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        inputs = [node.input[0], node.input[1]]
        for slot, tag in ((2, "fc1"), (4, "fc2")):
            weights, transpose = _resolve(
                node.input[slot], initializers, producers, weights_dir
            )
            codes, scales = quantize_rows(weights.astype(np.float32), bits)
            base = f"{node.name}.{tag}"
            graph.initializer.extend(
                [
                    numpy_helper.from_array(codes, f"{base}.qweight"),
                    numpy_helper.from_array(scales, f"{base}.scales"),
                ]
            )
            inputs += [f"{base}.qweight", f"{base}.scales", ""]
            if transpose is not None:
                dead.append(transpose)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        outputs = list(node.output)
        rescale = not attrs.get("normalize_routing_weights", 0)
        if rescale:  # the kernel renormalises anyway: scale back by the top-k mass
            mass_nodes, mass = _topk_mass(node, attrs.get("k", 1), graph)
            nodes.extend(mass_nodes)
            outputs = [f"{outputs[0]}.renormalised"]
            attrs["normalize_routing_weights"] = 1
        nodes.append(helper.make_node(
            "QMoE",
            inputs,
            outputs,
            domain="com.microsoft",
            name=node.name.replace("/MoE", "/QMoE"),
            expert_weight_bits=bits,
            **attrs,
        ))
        if rescale:
            nodes.append(helper.make_node("Mul", [outputs[0], mass], list(node.output),
                                          name=f"{node.name}/RouterTopKScale"))
        replaced += 1
    kept = []
    for node in nodes:
        if node not in dead:
            kept.append(type(node)())
            kept[-1].CopyFrom(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return replaced
