"""Numerics the families share: RMSNorm, rotary embeddings, attention and its cache.

Each function is written so that ``torch.onnx.export(dynamo=True)`` sees fixed shapes and
plain ops (no data-dependent shapes), and so that eager PyTorch matches the original
modeling code within float tolerance.

Attention runs over ``[cached keys | this call's keys]`` under a visibility mask that the
caller builds (``runtime/attention.py`` states the rules: bidirectional, causal,
block-causal, with left padding): one code path serves the full canvas, prefill, a cached
block step and causal decoding. Keys are cached after RoPE (and after any q/k norm), so a
cached key is never rotated again.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as LLaDA, OLMoE and Qwen2 all do."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(positions: torch.Tensor, rotary_dim: int, theta: float):
    """cos/sin tables of shape [B, 1, L, rotary_dim] (float32) for integer positions [B, L]."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / (theta ** (exponent / rotary_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, L, rotary_dim / 2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos, sin, full_precision: bool) -> torch.Tensor:
    if full_precision:
        return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


@torch.library.custom_op("dllm_export::rope", mutates_args=())
def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               full_precision: bool) -> torch.Tensor:
    """The rotation of ``apply_rope`` as one op, so that the exporter lowers it to the
    target's RoPE op (export/onnx_attention.py). x: [B, H, L, R]; cos, sin: [B, 1, L, R]
    (each half of R repeated, as ``rope_tables`` makes them)."""
    return _rotate(x, cos, sin, full_precision)


@fused_rope.register_fake
def _(x, cos, sin, full_precision):
    return torch.empty_like(x)


def apply_rope(x: torch.Tensor, cos, sin, full_precision: bool) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of each head (partial RoPE when smaller).

    ``full_precision`` computes in float32 like LLaDA's ``rope_full_precision``; otherwise the
    tables are cast to the activation dtype like the transformers models do.
    """
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    out = (fused_rope if _TRACE_FUSED.get() else _rotate)(rot, cos, sin, full_precision)
    if rest.shape[-1] == 0:
        return out
    return torch.cat((out, rest), dim=-1)


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype):
    """Additive key-padding bias [B, 1, 1, L]: padded keys are hidden from every query.

    Padded queries still attend to real keys, so no row is all -inf (which would give NaN
    that later layers spread through the values).
    """
    if attention_mask is None:
        return None
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


class KVCache:
    """What one call attends to besides its own keys, and the keys it produced.

    ``past``: one tuple per layer of its ``kinds`` states (keys and values ``[B, Hkv, C,
    Dh]``; a family with more state, such as ZAYA1's convolution input, puts it first), or
    None (a call with nothing cached). Each ``update_and_fetch(*states)`` call hands in the
    next states of the current layer, in order, and gets ``[past | own]`` back along the
    slot axis (2). After the call ``presents`` holds each layer's own states ``[B, heads,
    Lq, width]``; whoever owns the cache decides where they go.
    """

    def __init__(self, past=None, kinds: int = 2):
        self.past = list(past) if past is not None else None
        self.kinds = kinds
        self._own: list = []

    @property
    def presents(self) -> list[tuple]:
        own, kinds = self._own, self.kinds
        return [tuple(own[i:i + kinds]) for i in range(0, len(own), kinds)]

    def update_and_fetch(self, *states):
        layer, first = divmod(len(self._own), self.kinds)
        self._own.extend(states)
        if self.past is None:
            return states
        past = self.past[layer][first:first + len(states)]
        return tuple(torch.cat((old, new), dim=2) for old, new in zip(past, states, strict=True))


def attention_bias(visible, attention_mask, dtype: torch.dtype):
    """Additive bias ``[B, 1, Lq, K]``: from ``visible`` ``[B, Lq, K]`` (True: the query may
    attend to that key), else the key-padding rule of ``attention_mask`` ``[B, L]``."""
    if visible is None:
        return padding_bias(attention_mask, dtype)
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible.to(torch.bool)[:, None], zero, torch.finfo(dtype).min)


def _sdpa(q, k, v, bias):
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)
    batch, heads, length, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


@torch.library.custom_op("dllm_export::attention", mutates_args=())
def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bias: torch.Tensor | None, key_padding: bool) -> torch.Tensor:
    """``attention`` as one op, so that the exporter lowers it to the target's fused
    attention (export/onnx_attention.py). ``key_padding``: ``bias`` is a key-padding bias
    ``[B, 1, 1, K]`` (0 or the dtype's minimum), which the lowering may pass as a mask."""
    return _sdpa(q, k, v, bias)


@fused_attention.register_fake
def _(q, k, v, bias, key_padding):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1] * v.shape[3])


_TRACE_FUSED = contextvars.ContextVar("trace_fused_attention", default=False)


@contextlib.contextmanager
def trace_fused_attention():
    """While tracing for export, ``attention`` calls ``dllm_export::attention`` instead of
    the decomposable ``scaled_dot_product_attention``, and ``apply_rope`` calls
    ``dllm_export::rope`` (eager runs are not affected)."""
    token = _TRACE_FUSED.set(True)
    try:
        yield
    finally:
        _TRACE_FUSED.reset(token)


def attention(q, k, v, bias):
    """Scaled dot-product attention with grouped key/value heads under an additive bias.

    q: [B, H, Lq, Dh]; k, v: [B, Hkv, K, Dh]; bias: [B, 1, 1 or Lq, K] or None (all
    visible). Returns [B, Lq, H*Dh].
    """
    if _TRACE_FUSED.get():
        return fused_attention(q, k, v, bias, bias is not None and bias.shape[2] == 1)
    return _sdpa(q, k, v, bias)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*Dh] -> [B, H, L, Dh]"""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def default_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Absolute positions 0..L-1 broadcast over the batch."""
    return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :].expand_as(input_ids)
