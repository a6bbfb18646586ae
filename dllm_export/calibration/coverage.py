"""What the calibration states cover: mask ratios, and for MoE models the tokens per expert.

Routing is read from a calibration-only copy of the graph whose extra outputs are each MoE
layer's routing scores: the input of the layer's ``TopK`` (softmax of the router plus any
selection bias), or, where the graph has no TopK (``com.microsoft::MoE``), the router
``model.layers.{i}.mlp.gate/{MatMul,Gemm}`` logits, softmaxed here. Top-k in numpy then
gives the real assignment at any k. The copy is held in memory and reads the artifact's weights file; the
artifact is never written to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllm_export.calibration.states import CanvasState, batched

ROUTER = re.compile(r"^(?P<scope>.*layers\.(?P<layer>\d+)\.mlp)\.gate/(MatMul|Gemm)")
HISTOGRAM_BINS = 10


@dataclass
class RouterTap:
    layer: int
    scope: str  # e.g. "model.layers.3.mlp"
    output: str  # graph value holding the scores or logits
    softmax: bool  # True when ``output`` is logits that still need a softmax


def mask_ratio_histogram(states: list[CanvasState]) -> dict:
    """Counts of states per mask-ratio bin of width 0.1, per origin."""
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    out = {
        "bins": [f"{a:.1f}-{b:.1f}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    }
    for origin in sorted({s.origin for s in states}):
        ratios = [s.mask_ratio for s in states if s.origin == origin]
        out[origin] = np.histogram(np.clip(ratios, 0, 1), bins=edges)[0].tolist()
    return out


def find_router_taps(model) -> list[RouterTap]:
    """Router outputs of an ONNX ``ModelProto`` (nodes named by ``export.passes``)."""
    taps = []
    for node in model.graph.node:
        match = ROUTER.match(node.name)
        if not match:
            continue
        scope = match.group("scope")
        topk = next(
            (
                n
                for n in model.graph.node
                if n.op_type == "TopK" and n.name.startswith(scope + "/")
            ),
            None,
        )
        if topk is not None:
            taps.append(
                RouterTap(int(match.group("layer")), scope, topk.input[0], False)
            )
        else:
            taps.append(
                RouterTap(int(match.group("layer")), scope, node.output[0], True)
            )
    return taps


def _routing_session(graph: Path, taps: list[RouterTap]):
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(graph), load_external_data=False)
    existing = {o.name for o in model.graph.output}
    for tap in taps:
        if tap.output not in existing:
            model.graph.output.append(
                helper.make_tensor_value_info(tap.output, onnx.TensorProto.FLOAT, None)
            )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The graph goes in as bytes (it is small: weights stay external); ONNX Runtime reads
    # the weights from the artifact's folder.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path",
        str(graph.parent.resolve()),
    )
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def expert_coverage(
    graph: Path,
    manifest: dict,
    states: list[CanvasState],
    calibration_top_k: int | None,
) -> dict | None:
    """Tokens routed to each expert over the calibration states, per MoE layer.

    Args:
        graph: the float artifact's ``model.onnx``.
        manifest: its manifest (``moe.top_k``, ``moe.experts``, the fixed batch).
        states: the calibration states.
        calibration_top_k: the k at which experts receive calibration statistics (the
            expert count for ``dense`` graphs, where every expert runs on every token).
    Returns:
        None for a dense model; else ``{"top_k", "calibration_top_k", "layers": {scope:
        {"routed": [...], "calibrated": [...]}}, "unrouted": [names], "uncalibrated": [...]}``.
    """
    import onnx

    moe = manifest.get("moe")
    if not moe:
        return None
    taps = find_router_taps(onnx.load(str(graph), load_external_data=False))
    taps = list({tap.scope: tap for tap in reversed(taps)}.values())[::-1]  # one per layer
    if not taps:  # a router the taps do not recognise (ZAYA1's MLP over experts + skip)
        return None
    experts, top_k = moe["experts"], moe["top_k"]
    calibration_top_k = min(calibration_top_k or top_k, experts)
    routed = {t.scope: np.zeros(experts, dtype=np.int64) for t in taps}
    calibrated = {t.scope: np.zeros(experts, dtype=np.int64) for t in taps}
    session = _routing_session(Path(graph), taps)
    for ids, attention in batched(states, manifest["shapes"]["batch"]):
        values = session.run(
            [t.output for t in taps], {"input_ids": ids, "attention_mask": attention}
        )
        real = attention.reshape(-1).astype(bool)
        for tap, scores in zip(taps, values, strict=True):
            if scores.shape[-1] != experts:  # not an expert score (ZAYA1's skip class
                routed.pop(tap.scope, None)  # and router MLP): no coverage for it
                calibrated.pop(tap.scope, None)
                continue
            scores = scores.reshape(-1, experts)[real]
            if tap.softmax:
                scores = np.exp(scores - scores.max(-1, keepdims=True))
            order = np.argsort(-scores, axis=-1, kind="stable")
            if tap.scope not in routed:
                continue
            routed[tap.scope] += np.bincount(
                order[:, :top_k].ravel(), minlength=experts
            )
            calibrated[tap.scope] += np.bincount(
                order[:, :calibration_top_k].ravel(), minlength=experts
            )
    names = lambda counts: [
        f"{scope}.experts.{j}"
        for scope, c in counts.items()  # noqa: E731
        for j in np.flatnonzero(c == 0)
    ]
    return {
        "top_k": top_k,
        "calibration_top_k": calibration_top_k,
        "layers": {
            scope: {
                "routed": routed[scope].tolist(),
                "calibrated": calibrated[scope].tolist(),
            }
            for scope in routed
        },
        "unrouted": names(routed),
        "uncalibrated": names(calibrated),
    }
