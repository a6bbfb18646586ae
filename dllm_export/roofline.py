"""The roofline of one forward: a full canvas, a cached block step, one autoregressive token.

A step can be no faster than the larger of two floors: its FLOPs at the device's dense
tensor-core peak, and the bytes it must read at the device's memory bandwidth. This module
is the one place those numbers are computed; ``plan`` and the profiling reports use it.

What is counted:

* FLOPs: 2 per multiply-add of every matrix product (attention projections, the quadratic
  attention terms QK^T and PV, the MLP or the routed and shared experts, the router, the LM
  head). Norms, softmax, RoPE and the decode head's reductions are left out (a few percent).
* Bytes: every weight read once per forward. The embedding reads only the rows it gathers.
  An MoE layer reads only the experts that some token routes to: with T tokens each picking
  k of E experts uniformly, ``E * (1 - (1 - k/E)**T)`` distinct experts are hit, which is all
  of them for a full canvas (T = 256, k = 8, E = 64 gives 63.99...). Activation traffic is
  left out: fused kernels keep most of it on chip.

Every forward is ``call_cost``: ``queries`` rows per sequence that attend to ``cached`` cached
keys and to each other, reading the weights their tokens route to and the cached keys and
values. A full canvas is ``call_cost(L, 0)``, a cached block step ``call_cost(Lb, C)``, one
autoregressive token ``call_cost(1, context)``; ``generation_floor`` adds up a whole
generation in a cache mode from the forwards it makes.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_export.model_shape import ModelShape
from dllm_export.precision import MATRIX_BYTES, activation_bytes, kept_bytes


@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float
    compute_seconds: float
    memory_seconds: float

    @property
    def floor_seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def bound(self) -> str:
        """Which side of the roofline binds: "compute" or "memory"."""
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")

    def as_dict(self) -> dict:
        return {
            "flops": self.flops,
            "bytes": self.bytes,
            "compute_ms": 1e3 * self.compute_seconds,
            "memory_ms": 1e3 * self.memory_seconds,
            "floor_ms": 1e3 * self.floor_seconds,
            "bound": self.bound,
            "flops_per_byte": self.arithmetic_intensity,
        }


def expected_experts_hit(experts: int, per_token: int, tokens: int) -> float:
    """Expected distinct experts chosen when ``tokens`` tokens each pick ``per_token`` of
    ``experts`` uniformly at random (real routers are skewed, so this is an upper bound)."""
    if experts == 0:
        return 0.0
    return experts * (1.0 - (1.0 - per_token / experts) ** tokens)


def weight_bytes(shape: ModelShape, precision: str) -> float:
    """Bytes the weights occupy on the device at a precision (scales included)."""
    return (shape.matrix_parameters() * MATRIX_BYTES[precision]
            + shape.kept_parameters() * kept_bytes(precision))


def matrix_flops(shape: ModelShape, tokens: int, head_tokens: int | None = None) -> float:
    """FLOPs of every weight matrix applied to ``tokens`` tokens (attention projections,
    MLP or router + routed experts + shared expert), and of the LM head applied to
    ``head_tokens`` of them (None: all; the rows graph computes it for a block's rows)."""
    dense = 3 * shape.hidden * shape.dense_intermediate
    moe = shape.hidden * shape.experts + shape.experts_per_token * shape.expert_matrices()
    moe += 3 * shape.hidden * shape.shared_intermediate
    per_token = (shape.all_attention_matrices() + shape.dense_layers * dense
                 + shape.moe_layers * moe)
    head = tokens if head_tokens is None else head_tokens
    return 2.0 * (tokens * per_token + head * shape.hidden * shape.vocab)


def attention_flops(shape: ModelShape, batch: int, queries: int, keys: int) -> float:
    """FLOPs of QK^T and PV in every layer: the term quadratic in the canvas length."""
    return shape.layers * 4.0 * batch * shape.heads * queries * keys * shape.head_dim


def forward_flops(shape: ModelShape, batch: int, seq_len: int) -> float:
    """FLOPs of one bidirectional denoiser forward over a [batch, seq_len] canvas."""
    return matrix_flops(shape, batch * seq_len) + attention_flops(shape, batch, seq_len, seq_len)


def bytes_read(shape: ModelShape, precision: str, tokens: int) -> float:
    """Weight bytes one forward over ``tokens`` tokens must read (see the module doc)."""
    all_experts = shape.moe_layers * shape.experts * shape.expert_matrices()
    hit = expected_experts_hit(shape.experts, shape.experts_per_token, tokens)
    routed = shape.moe_layers * hit * shape.expert_matrices()
    matrices = shape.matrix_parameters() - all_experts + routed
    table = shape.vocab * shape.hidden
    # Kept weights minus the embedding table, of which only the gathered rows are read (a
    # tied table is read whole as the LM head anyway).
    kept = shape.kept_parameters() - (0 if shape.tied_embeddings else table)
    kept += tokens * shape.hidden
    return matrices * MATRIX_BYTES[precision] + kept * kept_bytes(precision)


def _cost(flops: float, nbytes: float, profile, precision: str) -> StepCost:
    return StepCost(
        flops=flops,
        bytes=nbytes,
        compute_seconds=flops / profile.peak_flops(precision),
        memory_seconds=nbytes / profile.bandwidth_bytes_per_s,
    )


def kv_cache_bytes(shape: ModelShape, precision: str, batch: int, context: int) -> float:
    """Bytes of the keys and values (and any other per-layer cache state) of ``context``
    tokens (stored at the activation precision), which a cached forward reads on top of the
    weights."""
    return shape.layers * batch * context * shape.cache_width * activation_bytes(precision)


def call_cost(shape: ModelShape, profile, precision: str, batch: int, queries: int,
              cached: int = 0, head_rows: int | None = None) -> StepCost:
    """The floor of one forward of ``queries`` rows per sequence over ``cached`` cached keys.

    Args:
        shape: the model's sizes (``model_shape``).
        profile: a ``DeviceProfile`` (peak throughput and bandwidth).
        precision: one of ``precision.PRECISIONS``.
        batch: sequences per forward.
        queries: rows computed per sequence (the canvas, a block, one token).
        cached: cached keys each row may attend to besides the call's own.
        head_rows: rows per sequence the LM head runs on (None: every row).
    """
    head = None if head_rows is None else batch * head_rows
    flops = matrix_flops(shape, batch * queries, head) + attention_flops(
        shape, batch, queries, cached + queries)
    nbytes = bytes_read(shape, precision, batch * queries)
    nbytes += kv_cache_bytes(shape, precision, batch, cached)
    return _cost(flops, nbytes, profile, precision)


def denoiser_step(shape: ModelShape, profile, precision: str, batch: int,
                  seq_len: int, head_rows: int | None = None) -> StepCost:
    """The floor of one full-canvas denoiser forward over ``[batch, seq_len]`` (its LM
    head over ``head_rows`` rows per sequence with the rows graph)."""
    return call_cost(shape, profile, precision, batch, seq_len, head_rows=head_rows)


def cached_step(shape: ModelShape, profile, precision: str, batch: int, block: int,
                cache_len: int) -> StepCost:
    """The floor of one cached block step: ``block`` rows over ``cache_len`` cached slots."""
    return call_cost(shape, profile, precision, batch, block, cache_len)


def autoregressive_token(shape: ModelShape, profile, precision: str, batch: int,
                         context: int) -> StepCost:
    """The floor of one autoregressive decode step: ``batch`` new tokens, each attending to
    a KV cache of ``context`` tokens (cache stored at the activation precision)."""
    return call_cost(shape, profile, precision, batch, 1, context)


def generation_floor(shape: ModelShape, profile, precision: str, mode: str, canvas: int,
                     block: int, forwards: int, blocks: int, window: int | None = None,
                     head_rows: int | None = None) -> dict:
    """The floor of a whole generation in a cache mode, from the forwards it made.

    ``none``: every forward a full canvas (its LM head over ``head_rows`` rows where the
    rows graph ran). ``prefix`` / ``dual``: a full forward per block,
    the other forwards a window (``window`` rows, prefix) or a block over the cache.
    ``block``: one prefill of the canvas, then block steps and commits over the cache.
    """
    full = denoiser_step(shape, profile, precision, 1, canvas)
    if mode == "none":
        refreshes = forwards
        full = step = denoiser_step(shape, profile, precision, 1, canvas, head_rows)
    else:
        rows = (window or canvas - block) if mode == "prefix" else block
        step = cached_step(shape, profile, precision, 1, rows, canvas)
        refreshes = 1 if mode == "block" else blocks
    steps = max(forwards - refreshes, 0)
    seconds = refreshes * full.floor_seconds + steps * step.floor_seconds
    return {"mode": mode, "full_forwards": refreshes, "cached_forwards": steps,
            "full_forward_floor_ms": 1e3 * full.floor_seconds,
            "cached_forward_floor_ms": 1e3 * step.floor_seconds,
            "cached_forward_bound": step.bound, "floor_seconds": seconds}


def bytes_by_part(shape: ModelShape, precision: str, tokens: int) -> dict:
    """``bytes_read`` split so that MoE effects show: the routed experts one forward over
    ``tokens`` tokens is expected to hit, and everything else it reads."""
    hit = expected_experts_hit(shape.experts, shape.experts_per_token, tokens)
    experts = shape.moe_layers * hit * shape.expert_matrices() * MATRIX_BYTES[precision]
    total = bytes_read(shape, precision, tokens)
    return {"tokens": tokens, "experts_hit_per_layer": hit,
            "experts_per_layer": shape.experts, "expert_bytes": experts,
            "other_bytes": total - experts, "total_bytes": total}


def achieved(cost: StepCost, seconds: float) -> dict:
    """What a measured step time means against its floor: how far above it, and the
    bandwidth and throughput it would take to do the step's work in that time."""
    if not seconds or seconds <= 0:
        return {}
    return {"measured_ms": 1e3 * seconds,
            "measured_over_floor": seconds / cost.floor_seconds,
            "achieved_gb_per_s": cost.bytes / seconds / 1e9,
            "achieved_tflop_per_s": cost.flops / seconds / 1e12}
