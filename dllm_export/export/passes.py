"""Post-export passes over the exported graph (onnx_ir), one function each, run in order.

1. ``name_by_module``: nodes become ``<module path>/<op>`` and the weights they consume
   ``<module path>.weight_t`` instead of ``node_linear_3`` / ``val_123``, so quantisation
   exclusions (``*mlp.gate*``, ``*lm_head*``) and reports speak in checkpoint names.
2. ``strip_torch_metadata``: drop the exporter's per-node stack traces and FX dumps (they
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


def strip_torch_metadata(model) -> None:
    for node in model.graph:
        for key in [k for k in node.metadata_props if k.startswith("pkg.torch") or k == "namespace"]:
            del node.metadata_props[key]


PASSES = (name_by_module, strip_torch_metadata)


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
    logits = head[-1].input[0]
    model.graph.node.append(helper.make_node("Identity", [logits], ["logits"], name="logits_output"))
    model.graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(dst))
