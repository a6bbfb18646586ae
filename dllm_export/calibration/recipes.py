"""Which graph nodes are quantised: a predicate over node names, decided outside the model.

Nodes are named ``<module path>/<Op>`` by ``export.passes`` (``model.layers.0.mlp.gate/Gemm``,
``lm_head/MatMul``), so recipes speak in checkpoint names. Candidates are the MatMul and Gemm
nodes that multiply by a weight (an initializer): the linear layers. Attention's
activation-by-activation MatMuls, norms, the embedding lookup and the softmaxes are never
candidates. Of the candidates, these stay in high precision unless asked:

* routers (``*.mlp.gate/*``, ``*router*``): a flipped top-k choice sends a token to another
  expert, an error no later layer undoes (``--quantize-router`` to include them);
* the decode head: the last linear layer, whose logits the sampler ranks directly;
* every node matching an ``--exclude`` pattern (fnmatch on the node name, or an op type).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

ROUTER_PATTERNS = ("*.mlp.gate/*", "*.moe.gate.*", "*router*")
LINEAR_OPS = ("MatMul", "Gemm")


@dataclass
class Recipe:
    exclude: tuple[str, ...] = ()
    quantize_router: bool = False
    quantize_head: bool = False
    # node-name patterns of the decode head; None: the last linear layer (a graph whose
    # head is not last, or that has none, names it: DiffusionGemma's encoder graphs)
    head: tuple[str, ...] | None = None


@dataclass
class Selection:
    quantize: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # node name -> reason


def linear_nodes(model) -> list:
    """MatMul/Gemm nodes whose second input is an initializer, in graph order."""
    weights = {init.name for init in model.graph.initializer}
    return [
        n
        for n in model.graph.node
        if n.op_type in LINEAR_OPS and len(n.input) > 1 and n.input[1] in weights
    ]


def select_nodes(model, recipe: Recipe) -> Selection:
    """Split the linear layers of ``model`` into quantised and excluded (with reasons)."""
    nodes = linear_nodes(model)
    last = nodes[-1].name if nodes else None
    selection = Selection()
    for node in nodes:
        reason = None
        is_head = (node.name == last if recipe.head is None
                   else _matches(node, recipe.head) or _matches_weight(node, recipe.head))
        if not recipe.quantize_router and _matches(node, ROUTER_PATTERNS):
            reason = "router"
        elif is_head and not recipe.quantize_head:
            reason = "decode head"
        elif _matches(node, recipe.exclude):
            reason = "--exclude"
        if reason:
            selection.excluded[node.name] = reason
        else:
            selection.quantize.append(node.name)
    return selection


def _matches_weight(node, patterns) -> bool:
    return any(fnmatch.fnmatchcase(node.input[1], p) for p in patterns)


def _matches(node, patterns) -> bool:
    return any(node.op_type == p or fnmatch.fnmatchcase(node.name, p) for p in patterns)
