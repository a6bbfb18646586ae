"""The autoregressive baseline: a family's backbone run causally with a key/value cache.

``CausalLM`` wraps a loaded family ``Model`` without copying its weights: the same
embedding, norms, projections, experts and LM head, the same ``layers.py`` numerics
(RMSNorm, RoPE, attention), but causal attention over a growing cache and one new token per
forward. A diffusion-trained model was never trained to predict the next token, so its
greedy output is meaningless: only the speed of this baseline matters.

Calling convention (also the ONNX graphs' I/O, see ``autoregressive_onnx.py``)::

    forward(input_ids [B, T], past_key_0, past_value_0, ...)  # past: [B, Hkv, P, Dh]
      -> next_token [B] int64, logits [B, V] float32 (last position),
         present_key_0, present_value_0, ...                 # [B, Hkv, P + T, Dh]

A prefill passes the prompt with no past (``CausalLM(..., with_past=False)``); each decode
step passes one token and the previous presents.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dllm_export.errors import DllmExportError
from dllm_export.models.layers import apply_rope, attention, rope_tables, split_heads
from dllm_export.profiling.measure import DecodeTimes


@dataclass
class LayerParts:
    """One pre-norm decoder layer, as references to the family's own modules."""

    attn_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    mlp_norm: nn.Module
    mlp: object  # callable h -> MLP output (routed experts plus any shared expert)
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


@dataclass
class Backbone:
    embed: nn.Embedding
    layers: list
    final_norm: nn.Module
    head_weight: torch.Tensor  # [V, D]: the LM head, or the tied embedding
    heads: int
    kv_heads: int
    rotary_dim: int
    rope_theta: float
    rope_full_precision: bool
    clip_qkv: float | None = None


def _llada(model) -> Backbone:
    args, transformer = model.args, model.model.transformer
    layers = [
        LayerParts(
            b.attn_norm,
            b.q_proj,
            b.k_proj,
            b.v_proj,
            b.attn_out,
            b.ff_norm,
            lambda h, b=b: b.ff_out(F.silu(b.ff_proj(h)) * b.up_proj(h)),
        )
        for b in transformer.blocks
    ]
    head = transformer.wte.weight if args.weight_tying else transformer.ff_out.weight
    return Backbone(
        transformer.wte,
        layers,
        transformer.ln_f,
        head,
        args.n_heads,
        args.n_kv_heads,
        args.head_dim,
        args.rope_theta,
        args.rope_full_precision,
    )


def _with_shared_expert(layer):
    if hasattr(layer, "shared_expert"):
        return lambda h: layer.mlp(h) + layer.shared_expert(h)
    return layer.mlp


def _qwen_style(model, rotary_dim: int, clip=None) -> Backbone:
    """LLaDA-MoE and Dream share the transformers layout (model.layers[i].self_attn...)."""
    args, inner = model.args, model.model
    layers = []
    for layer in inner.layers:
        attn = layer.self_attn
        layers.append(
            LayerParts(
                layer.input_layernorm,
                attn.q_proj,
                attn.k_proj,
                attn.v_proj,
                attn.o_proj,
                layer.post_attention_layernorm,
                _with_shared_expert(layer),
                getattr(attn, "q_norm", None),
                getattr(attn, "k_norm", None),
            )
        )
    head = (
        inner.embed_tokens.weight if args.tie_word_embeddings else model.lm_head.weight
    )
    return Backbone(
        inner.embed_tokens,
        layers,
        inner.norm,
        head,
        args.num_attention_heads,
        args.num_key_value_heads,
        rotary_dim,
        args.rope_theta,
        False,
        clip,
    )


# A family hook (``decode_backbone(model)``) in models/ would replace this table.
BACKBONES = {
    "llada": _llada,
    "llada-moe": lambda m: _qwen_style(m, m.args.rotary_dim, m.args.clip_qkv),
    "dream": lambda m: _qwen_style(m, m.args.head_dim),
}


def backbone(model, family: str) -> Backbone:
    if family not in BACKBONES:
        raise DllmExportError(
            f"no autoregressive baseline for family {family!r} "
            f"(supported: {', '.join(BACKBONES)})"
        )
    return BACKBONES[family](model)


class CausalLM(nn.Module):
    """The family's weights run causally with a KV cache (see the module doc)."""

    def __init__(self, model, family: str, with_past: bool = True):
        super().__init__()
        self.model = model  # registered, so export sees the weights as parameters
        self.parts = backbone(model, family)
        self.with_past = with_past

    @property
    def cache_tensors(self) -> int:
        return 2 * len(self.parts.layers)

    def _attend(self, layer: LayerParts, h, cos, sin, past_k, past_v):
        parts = self.parts
        q = split_heads(layer.q_proj(h), parts.heads)
        k = split_heads(layer.k_proj(h), parts.kv_heads)
        v = split_heads(layer.v_proj(h), parts.kv_heads)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        if parts.clip_qkv is not None:
            q, k, v = (t.clamp(-parts.clip_qkv, parts.clip_qkv) for t in (q, k, v))
        full = parts.rope_full_precision
        q, k = apply_rope(q, cos, sin, full), apply_rope(k, cos, sin, full)
        if past_k is not None:
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        return q, k, v

    def forward(self, input_ids, *past):
        parts = self.parts
        new = input_ids.shape[1]
        cached = past[0].shape[2] if past else 0
        positions = (cached + torch.arange(new, device=input_ids.device))[None, :]
        cos, sin = rope_tables(
            positions.expand(input_ids.shape[0], new),
            parts.rotary_dim,
            parts.rope_theta,
        )
        x = parts.embed(input_ids)
        # Query i (absolute position cached + i) sees keys 0..cached + i.
        keys = torch.arange(cached + new, device=input_ids.device)
        visible = keys[None, :] <= positions[0][:, None]
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        bias = torch.where(visible, zero, torch.finfo(x.dtype).min)[None, None]
        presents = []
        for index, layer in enumerate(parts.layers):
            past_k = past[2 * index] if past else None
            past_v = past[2 * index + 1] if past else None
            q, k, v = self._attend(layer, layer.attn_norm(x), cos, sin, past_k, past_v)
            presents += [k, v]
            x = x + layer.o_proj(attention(q, k, v, bias))
            x = x + layer.mlp(layer.mlp_norm(x))
        last = parts.final_norm(x[:, -1])
        logits = F.linear(last, parts.head_weight).float()
        return (logits.argmax(dim=-1), logits, *presents)


class TorchDecoder:
    """Greedy decoding in eager PyTorch over a loaded model."""

    name = "torch"

    def __init__(self, model, family: str, device: str = "cpu"):
        self.device = torch.device(device)
        self.lm = CausalLM(model, family).to(self.device).eval()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def decode(self, prompt: list[int], new_tokens: int) -> DecodeTimes:
        """Prefill ``prompt``, then ``new_tokens`` greedy steps of one token each."""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        times, out = [], []
        with torch.inference_mode():
            started = time.perf_counter()
            token, _, *cache = self.lm(ids)
            self._sync()
            prefill = time.perf_counter() - started
            for _ in range(new_tokens):
                started = time.perf_counter()
                token, _, *cache = self.lm(token[:, None], *cache)
                out.append(
                    int(token[0])
                )  # reading the id synchronises, as a real loop must
                times.append(time.perf_counter() - started)
        return DecodeTimes(prefill, times, out)

    def close(self):
        pass
