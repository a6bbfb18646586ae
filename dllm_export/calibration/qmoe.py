"""``com.microsoft::MoE`` -> ``QMoE``: INT8 or INT4 expert weights for ``--moe ort`` artifacts.

The exporter's MoE node takes fc1 ``[E, 2I, D]`` (gate/up interleaved) and fc2 ``[E, D, I]``
in nn.Linear layout, computed by a ``Transpose`` of the packed weights. Here each expert
matrix is quantised per output row, symmetric round-to-nearest, and stored the way the
onnxruntime 1.32 CPU kernel reads it: unsigned with an offset (128 for 8 bits, 8 for 4 bits,
two 4-bit values per byte, low nibble first) and float scales ``[E, N]``. Routing stays
float (the node takes the router logits). No calibration: weights only.
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


def moe_to_qmoe(model, bits: int, weights_dir: Path) -> int:
    """Replace every ``MoE`` node of ``model`` (weights loaded or in ``weights_dir``) by
    ``QMoE``, in place; returns how many. Float expert weights are dropped."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    replaced, dead = 0, []
    for index, node in enumerate(graph.node):
        if node.op_type != "MoE" or node.domain != "com.microsoft":
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
        qmoe = helper.make_node(
            "QMoE",
            inputs,
            list(node.output),
            domain="com.microsoft",
            name=node.name.replace("/MoE", "/QMoE"),
            expert_weight_bits=bits,
            **attrs,
        )
        graph.node[index].CopyFrom(qmoe)
        replaced += 1
    for node in dead:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return replaced
