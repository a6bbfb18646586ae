"""Measured numbers against the roofline: the same ``roofline.py`` functions ``plan`` uses.

For a diffusion point the floor is one denoiser forward over the measured canvas
(``denoiser_step``), compared with the median backend forward time; for the autoregressive
baseline it is one token over the mean cache length (``autoregressive_token``), compared
with the median decode step. Predicted tokens/s: diffusion = TPF / step floor, the
autoregressive baseline = 1 / token floor.
"""

from __future__ import annotations

from dllm_export import roofline
from dllm_export.precision import FLOAT_PRECISIONS, MATRIX_BYTES


def _floor(function, shape, profile, precision, *args):
    """The StepCost, or None with a reason when the profile lacks the precision's peak."""
    try:
        return function(shape, profile, precision, *args), None
    except KeyError:
        return None, (
            f"{profile.name} lists no peak for {precision}: no roofline for this point"
        )


def diffusion_roofline(shape, profile, precision: str, measured: dict,
                       settings: dict | None = None) -> dict:
    """The full-canvas floor beside the measured forward, and (with the point's sampler
    ``settings``) the floor of a whole generation in its cache mode: full forwards for
    refreshes, cached-step floors for the rest (``roofline.generation_floor``)."""
    canvas = measured.get("canvas_length")
    # the rows graph's LM head runs on a block's rows only (measured "head_rows")
    cost, reason = _floor(roofline.denoiser_step, shape, profile, precision, 1, canvas,
                          measured.get("head_rows"))
    if cost is None:
        return {"note": reason}
    out = {"precision": precision, "canvas_length": canvas, **cost.as_dict()}
    mode = measured.get("cache") or "none"
    forward = (measured.get("forward") or {}).get("median_ms")
    if forward and mode == "none":
        out.update(roofline.achieved(cost, forward / 1e3))
    tpf = measured.get("tokens_per_forward") or 0
    out["predicted_tokens_per_second"] = tpf / cost.floor_seconds
    forwards = (measured.get("forwards_per_generation") or {}).get("median")
    if settings and forwards:
        gen = settings["gen_length"]
        block = settings.get("block_length") or gen
        floor = roofline.generation_floor(shape, profile, precision, mode, canvas, block,
                                          int(forwards), gen // block, gen,
                                          measured.get("head_rows"))
        floor["predicted_tokens_per_second"] = gen / floor["floor_seconds"]
        out["generation"] = floor
        out["predicted_tokens_per_second"] = floor["predicted_tokens_per_second"]
    return out


def autoregressive_roofline(
    shape, profile, precision: str, context: float, measured: dict | None
) -> dict:
    cost, reason = _floor(
        roofline.autoregressive_token, shape, profile, precision, 1, int(round(context))
    )
    if cost is None:
        return {"note": reason}
    out = {
        "precision": precision,
        "context": context,
        **cost.as_dict(),
        "predicted_tokens_per_second": 1.0 / cost.floor_seconds,
    }
    token = ((measured or {}).get("token") or {}).get("median_ms")
    if token:
        out.update(roofline.achieved(cost, token / 1e3))
    return out


def moe_traffic(
    shape, precision: str, canvas: int, context: float, experts_hit: dict | None
) -> dict | None:
    """Bytes moved per forward, split into routed experts and the rest: a full canvas
    reaches nearly every expert, one autoregressive token only its top-k."""
    if not shape.moe_layers:
        return None
    diffusion = roofline.bytes_by_part(shape, precision, canvas)
    token = roofline.bytes_by_part(shape, precision, 1)
    token["kv_cache_bytes"] = roofline.kv_cache_bytes(shape, precision, 1, int(context))
    token["total_bytes"] += token["kv_cache_bytes"]
    out = {
        "experts": shape.experts,
        "top_k": shape.experts_per_token,
        "moe_layers": shape.moe_layers,
        "expert_bytes_each": shape.expert_matrices() * MATRIX_BYTES[precision],
        "diffusion_step": diffusion,
        "autoregressive_token": token,
        "routing": "uniform (expected distinct experts)",
    }
    if experts_hit:
        for side, key in (
            ("diffusion_step", "diffusion_hit_per_layer"),
            ("autoregressive_token", "autoregressive_hit_per_layer"),
        ):
            hits = experts_hit.get(key) or []
            if hits:
                out[side]["measured_hit_per_layer"] = hits
                out[side]["measured_expert_bytes"] = (
                    sum(hits) * out["expert_bytes_each"]
                )
        out["measured_on"] = "the model's own routers (PyTorch forward hooks, untimed)"
    return out


def roofline_everywhere(
    shape, canvas: int, context: float, tokens_per_forward: float, precision: str
) -> list[dict]:
    """Floors of this model on every shipped profile: the step, one autoregressive token,
    the TPF at which diffusion breaks even, and the speed-up at the measured TPF."""
    from dllm_export.device_profiles import all_profiles

    rows = []
    for profile in all_profiles():
        # As plan and build do: float artifacts build at the profile's precision,
        # quantised ones keep theirs (where the device runs it).
        chosen = profile.build.precision if precision in FLOAT_PRECISIONS else precision
        if chosen not in profile.precisions:
            continue
        step, _ = _floor(roofline.denoiser_step, shape, profile, chosen, 1, canvas)
        token, _ = _floor(
            roofline.autoregressive_token,
            shape,
            profile,
            chosen,
            1,
            int(round(context)),
        )
        if step is None or token is None:
            continue
        break_even = step.floor_seconds / token.floor_seconds
        rows.append(
            {
                "profile": profile.name,
                "precision": chosen,
                "step_floor_ms": 1e3 * step.floor_seconds,
                "step_bound": step.bound,
                "token_floor_ms": 1e3 * token.floor_seconds,
                "token_bound": token.bound,
                "break_even_tpf": break_even,
                "predicted_speedup_at_measured_tpf": tokens_per_forward / break_even,
            }
        )
    return rows


def headline(baseline: dict, autoregressive: dict | None) -> dict:
    """The few numbers a README quotes."""
    measured, floor = baseline["measured"], baseline.get("roofline", {})
    out = {
        "step_ms_median": measured["forward"].get("median_ms"),
        "step_with_sampler_ms_median": measured["step"].get("median_ms"),
        "step_floor_ms": floor.get("floor_ms"),
        "bound": floor.get("bound"),
        "measured_over_floor": floor.get("measured_over_floor"),
        "achieved_gb_per_s": floor.get("achieved_gb_per_s"),
        "achieved_tflop_per_s": floor.get("achieved_tflop_per_s"),
        "tokens_per_forward": measured["tokens_per_forward"],
        "forwards_per_generation": measured["forwards_per_generation"].get("median"),
        # Both sides fill gen_length positions: the canvas rate is the like-for-like one.
        "diffusion_tokens_per_second": measured["tokens_per_second"].get("median"),
        "diffusion_answer_tokens_per_second": measured["answer_tokens_per_second"].get(
            "median"
        ),
        "first_block_ms": measured["first_block_ms"].get("median"),
    }
    if baseline.get("quality", {}).get("accuracy") is not None:
        out["accuracy"] = baseline["quality"]["accuracy"]
    if autoregressive:
        ar = autoregressive.get("measured") or {}
        ar_rate = (ar.get("tokens_per_second") or {}).get("median")
        out["autoregressive_tokens_per_second"] = ar_rate
        out["autoregressive_token_ms_median"] = (ar.get("token") or {}).get("median_ms")
        if ar_rate and out["diffusion_tokens_per_second"]:
            out["diffusion_over_autoregressive"] = (
                out["diffusion_tokens_per_second"] / ar_rate
            )
            out["diffusion_answer_over_autoregressive"] = (
                out["diffusion_answer_tokens_per_second"] / ar_rate
            )
        predicted = autoregressive.get("roofline", {}).get(
            "predicted_tokens_per_second"
        )
        if predicted and floor.get("predicted_tokens_per_second"):
            out["roofline_diffusion_over_autoregressive"] = (
                floor["predicted_tokens_per_second"] / predicted
            )
    return out
