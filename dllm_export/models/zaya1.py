"""ZAYA1 (Zyphra/ZAYA1-8B; transformers' ``ZayaForCausalLM``): an autoregressive MoE with
compressed convolutional attention (CCA) and a top-1 router with a skip expert.

Names follow the checkpoint transformers writes: ``model.embed_tokens``,
``model.input_hidden_states_{scale,bias}``, per layer ``self_attn.qkv_proj.{q_proj, k_proj,
v_proj_current, v_proj_delayed, conv_qk_depthwise, conv_qk_grouped}``, ``self_attn.qk_norm.temp``,
``self_attn.o_proj``, ``{input,post_attention}_layernorm``, ``post_{attention,mlp}_residual_scale``,
``mlp.gate.{down_proj, router_states_scale, router_mlp.*, balancing_biases}`` and the experts
stacked as ``mlp.experts.gate_up_proj`` [E, 2I, D] and ``mlp.experts.down_proj`` [E, D, I]
(split into per-expert views at load: ``expand``); ``model.norm``; the head tied to the
embedding. The residual stream is float32. ``balancing_biases`` are used as stored
(transformers 5.24 resets the skip class's entry to -1 when it loads a checkpoint).

CCA, per token p: the q/k projections of p and of the ``K = (cca_time0 - 1) + (cca_time1 - 1)``
tokens before it go through a depthwise then a grouped causal convolution (added to a
residual mix of q and k); half the value heads come from token p, half from the token
before it (``v_proj_delayed``). So a token reads its predecessors' projections, and the cache
holds them per slot (``conv``, ``delayed``) besides keys and values. Which token is a
token's predecessor is decided by the attention mask, not by row order: the predecessor of
a query at position p is the key at position p - 1 that the query may attend to (none: zero,
as transformers' left padding gives). One rule for the full forward, prefill, a cached step
and draft-and-verify forwards, where draft rows never read a neighbouring row of another
region (the convolution is segmented by the mask).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from dllm_export.errors import DllmExportError
from dllm_export.families import family
from dllm_export.models import config_fields
from dllm_export.models.layers import (
    RMSNorm,
    apply_rope,
    attention,
    default_positions,
    rope_tables,
)
from dllm_export.models.moe import SparseMoeBlock

SHIFT_LOGITS = family("zaya1").shift_logits
CACHE_KINDS = ("conv", "delayed", "key", "value")

# Gemma-style markers as ZAYA1-8B's tokenizer has them (bos 2, eos/end of turn 106 there);
# the mask token is ours (no ZAYA1 diffusion tokenizer is public).
TOKENIZER = {
    "bos": "<bos>",
    "eos": "<end_of_turn>",
    "eot": "<eos>",
    "mask": "<mask>",
    "extra": ["<start_of_turn>"],
    "chat_template": (
        "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
        "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int = 1
    router_hidden_size: int = 256
    cca_time0: int = 2
    cca_time1: int = 2
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    layer_types: list | None = None
    sliding_window: int | None = None
    attention_bias: bool = False
    lm_head_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        for name in [f.name for f in fields(cls)][:8]:
            if config.get(name) is None:
                raise DllmExportError(f"config.json: ZAYA1 needs field '{name}'")
        return cls(**config_fields(cls, config))

    def __post_init__(self):
        if self.num_experts_per_tok != 1:
            raise DllmExportError("config.json: 'num_experts_per_tok' must be 1 (ZAYA routes "
                                  "each token to one expert or the skip class)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise DllmExportError("config.json: 'num_attention_heads' must divide by "
                                  "'num_key_value_heads'")
        types = self.layer_types or ["hybrid"] * self.num_hidden_layers
        if len(types) != self.num_hidden_layers or set(types) != {"hybrid"}:
            raise DllmExportError(
                "config.json: 'layer_types' other than 'hybrid' (sliding-window layers) are "
                "not supported yet; ZAYA1-8B has only 'hybrid' layers")
        if self.lm_head_bias:
            raise DllmExportError("config.json: 'lm_head_bias' true is not supported (ZAYA1-8B "
                                  "has none)")
        if self.hidden_act != "silu":
            raise DllmExportError(f"config.json: hidden_act {self.hidden_act!r} (silu only)")
        if min(self.cca_time0, self.cca_time1) < 1:
            raise DllmExportError("config.json: 'cca_time0' and 'cca_time1' must be at least 1")
        rope = (self.rope_parameters or {}).get("hybrid") or {}
        self.rope_theta = float(rope.get("rope_theta", 5_000_000.0))
        self.rotary_dim = int(self.head_dim * rope.get("partial_rotary_factor", 0.5))
        if rope.get("rope_type", "default") != "default":
            raise DllmExportError("config.json: rope_parameters.hybrid.rope_type must be "
                                  "'default'")

    @property
    def conv_taps(self) -> int:
        """Tokens before p whose projections p's convolution reads."""
        return (self.cca_time0 - 1) + (self.cca_time1 - 1)

    @property
    def conv_channels(self) -> int:
        return (self.num_attention_heads + self.num_key_value_heads) * self.head_dim


def predecessors(positions, key_positions, visible, taps: int):
    """``[B, taps, Lq, K]``: for offset t + 1, a one-hot of the key at position p - t - 1
    that the query (at position p) may attend to; all zero where there is none."""
    offsets = torch.arange(1, taps + 1, device=positions.device)
    want = positions[:, None, :] - offsets[None, :, None]  # [B, taps, Lq]
    hit = key_positions[:, None, None, :] == want[..., None]
    return (hit & visible[:, None]).float()


class CCAProjection(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        q_width = args.num_attention_heads * args.head_dim
        kv_width = args.num_key_value_heads * args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, q_width, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_width, bias=bias)
        self.v_proj_current = nn.Linear(args.hidden_size, kv_width // 2, bias=bias)
        self.v_proj_delayed = nn.Linear(args.hidden_size, kv_width // 2, bias=bias)
        channels = args.conv_channels
        self.conv_qk_depthwise = nn.Conv1d(channels, channels, args.cca_time0, groups=channels)
        self.conv_qk_grouped = nn.Conv1d(channels, channels, args.cca_time1,
                                         groups=args.num_attention_heads + args.num_key_value_heads)

    def mix(self, window):
        """[N, channels, taps + 1] -> [N, channels, 1]: the two causal convolutions, as
        the products they are: the depthwise one a weighted sum of shifted windows, the
        grouped one a batched matrix product per group. The same arithmetic as the two
        ``Conv1d`` (tests/test_zaya1.py); ONNX Runtime's CPU convolution over such short
        windows took 43 % of a 32-row draft step, these products a few percent."""
        depthwise, grouped = self.conv_qk_depthwise, self.conv_qk_grouped
        taps0 = depthwise.kernel_size[0]
        width = window.shape[2] - taps0 + 1  # the grouped convolution's taps
        mid = depthwise.bias[None, :, None] + sum(
            window[:, :, i : i + width] * depthwise.weight[None, :, 0, i, None]
            for i in range(taps0))  # [N, C, width]
        rows, channels = mid.shape[0], mid.shape[1]
        groups = grouped.groups
        per = channels // groups
        mid = mid.reshape(rows, groups, per * width).transpose(0, 1)  # [G, N, per * width]
        weight = grouped.weight.reshape(groups, per, per * width)  # [G, out, per * width]
        out = torch.matmul(mid, weight.transpose(1, 2)).transpose(0, 1)  # [N, G, out]
        return (out.reshape(rows, channels) + grouped.bias)[..., None]

    def forward(self, x, links, cache):
        """links: [B, taps, Lq, C + Lq] predecessor one-hots. Returns q [B, Lq, H, Dh],
        k [B, Lq, Hkv, Dh], v [B, Lq, Hkv, Dh]."""
        args = self.args
        batch, length, _ = x.shape
        heads, kv, head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        q, k = self.q_proj(x), self.k_proj(x)
        qk = torch.cat((q, k), dim=-1)
        delayed = self.v_proj_delayed(x)
        if self.v_proj_delayed.bias is not None:
            delayed = delayed - self.v_proj_delayed.bias  # re-added below, also with no predecessor
        if cache is not None:
            all_qk, all_delayed = (t[:, 0] for t in cache.update_and_fetch(qk[:, None], delayed[:, None]))
        else:
            all_qk, all_delayed = qk, delayed
        # p's window: the projections at p - taps, ..., p - 1 (zero without a predecessor), p
        before = [torch.matmul(links[:, t], all_qk) for t in reversed(range(args.conv_taps))]
        window = torch.stack((*before, qk), dim=-1)  # [B, Lq, channels, taps + 1]
        window = window.reshape(batch * length, args.conv_channels, args.conv_taps + 1)
        mixed = self.mix(window).reshape(batch, length, args.conv_channels)
        groups = heads // kv
        q_res = q.view(batch, length, heads, head_dim)
        k_res = k.view(batch, length, kv, head_dim).repeat_interleave(groups, dim=2)
        q_res = (q_res + k_res) * 0.5
        k_res = q_res.view(batch, length, kv, groups, head_dim).mean(dim=-2)
        query = mixed[..., :heads * head_dim].view(batch, length, heads, head_dim) + q_res
        key = mixed[..., heads * head_dim:].view(batch, length, kv, head_dim) + k_res
        value_delayed = torch.matmul(links[:, 0], all_delayed)
        if self.v_proj_delayed.bias is not None:
            value_delayed = value_delayed + self.v_proj_delayed.bias
        value = torch.cat((self.v_proj_current(x), value_delayed), dim=-1)
        return query, key, value.view(batch, length, kv, head_dim)


class QKNorm(nn.Module):
    """q and k scaled to norm sqrt(head_dim); keys times a learnt per-KV-head ``temp``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.scale = args.head_dim ** 0.5
        self.temp = nn.Parameter(torch.zeros(args.num_key_value_heads))

    def forward(self, q, k):
        eps = torch.finfo(q.dtype).eps
        q = q * (self.scale / q.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        k = k * (self.scale / k.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        return q, k * self.temp[None, None, :, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.qkv_proj = CCAProjection(args)
        self.qk_norm = QKNorm(args)
        self.o_proj = nn.Linear(args.num_attention_heads * args.head_dim, args.hidden_size,
                                bias=args.attention_bias)

    def forward(self, x, cos, sin, bias, links, cache=None):
        q, k, v = self.qkv_proj(x, links, cache)
        q, k = self.qk_norm(q, k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.o_proj(attention(q, k, v, bias))


class ResidualScaling(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden))
        self.residual_scale = nn.Parameter(torch.ones(hidden))
        self.residual_bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, x, residual):
        return ((x + self.hidden_states_bias) * self.hidden_states_scale
                + (residual + self.residual_bias) * self.residual_scale)


class RouterMLP(nn.Module):
    def __init__(self, width: int, classes: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(width, eps)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, classes, bias=False)

    def forward(self, x):
        return self.out_proj(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(x))))))


class Router(nn.Module):
    """ZAYA's router: a down-projection (plus the previous layer's router state, scaled),
    an MLP over E + 1 classes (the last: skip), softmax, top-1 by probability plus the
    selection-only ``balancing_biases``; weight 0 when the skip class wins."""

    def __init__(self, args: ModelArgs, layer_index: int):
        super().__init__()
        self.num_experts = args.num_experts
        self.down_proj = nn.Linear(args.hidden_size, args.router_hidden_size)
        self.carries_state = layer_index != 0
        if self.carries_state:
            self.router_states_scale = nn.Parameter(torch.ones(args.router_hidden_size))
        self.router_mlp = RouterMLP(args.router_hidden_size, args.num_experts + 1,
                                    args.rms_norm_eps)
        self.register_buffer("balancing_biases", torch.zeros(args.num_experts + 1))

    def route(self, x, state):
        """x [T, D], state [T, R] or None -> (weights [T, 1], ids [T, 1], next state)."""
        hidden = self.down_proj(x)
        if self.carries_state and state is not None:
            hidden = hidden + state * self.router_states_scale
        probs = torch.softmax(self.router_mlp(hidden), dim=-1)
        ids = torch.topk(probs.float() + self.balancing_biases.float(), 1, dim=-1).indices
        weights = probs.gather(-1, ids).float()
        skip = ids == self.num_experts
        return weights.masked_fill(skip, 0.0), ids.masked_fill(skip, 0), hidden


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_residual_scale = ResidualScaling(args.hidden_size)
        self.post_mlp_residual_scale = ResidualScaling(args.hidden_size)
        gate = Router(args, layer_index)
        self.mlp = SparseMoeBlock(args.hidden_size, args.moe_intermediate_size,
                                  args.num_experts, 1, gate=gate)

    def forward(self, residual, state, cos, sin, bias, links, cache=None):
        x = self.self_attn(self.input_layernorm(residual), cos, sin, bias, links, cache)
        residual = self.post_attention_residual_scale(x, residual)
        x = self.post_attention_layernorm(residual)
        flat = x.reshape(-1, x.shape[-1])
        weights, ids, state = self.mlp.gate.route(flat, state)
        x = self.mlp(x, routed=(weights, ids))
        return self.post_mlp_residual_scale(x, residual), state


class ZayaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(args.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


def causal_visibility(attention_mask, length: int, device):
    """[B, L, L]: k <= q among real tokens, and every query sees itself."""
    index = torch.arange(length, device=device)
    causal = index[None, :] <= index[:, None]
    if attention_mask is None:
        return causal[None]
    real = attention_mask.to(torch.bool)[:, None, :]
    return (causal[None] & real) | torch.eye(length, dtype=torch.bool, device=device)[None]


class Model(nn.Module):
    """Causal LM: input_ids [B, Lq] -> float32 logits [B, Lq, V], row p predicting p + 1.

    Without ``visible`` a causal forward over the canvas (``attention_mask`` [B, L]: left
    padding). With ``positions`` [B, Lq], ``visible`` [B, Lq, C + Lq] and ``cache`` a cached
    call (contract.py); positions are canvas indices (slot j holds position j)."""

    shift_logits = SHIFT_LOGITS
    cache_kinds = CACHE_KINDS

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = ZayaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def moe_blocks(self):
        return [layer.mlp for layer in self.model.layers]

    def forward(self, input_ids, attention_mask=None, positions=None, visible=None, cache=None):
        args = self.args
        embed = self.model.embed_tokens(input_ids)
        x = ((embed + self.model.input_hidden_states_bias)
             * self.model.input_hidden_states_scale).float()
        positions = default_positions(input_ids) if positions is None else positions
        if visible is None:
            visible = causal_visibility(attention_mask, input_ids.shape[1], input_ids.device)
        visible = visible.to(torch.bool)
        past = visible.shape[-1] - input_ids.shape[1]
        key_positions = positions
        if past:
            slots = torch.arange(past, device=positions.device)[None].expand(positions.shape[0], -1)
            key_positions = torch.cat((slots, positions), dim=1)
        links = predecessors(positions, key_positions, visible, args.conv_taps)
        cos, sin = rope_tables(positions, args.rotary_dim, args.rope_theta)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        bias = torch.where(visible[:, None], zero, torch.finfo(x.dtype).min)
        state = None
        for layer in self.model.layers:
            x, state = layer(x, state, cos, sin, bias, links, cache)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if args.tie_word_embeddings else self.lm_head.weight
        return F.linear(x, head).float()


def expand(name: str, tensor, args: ModelArgs) -> dict | None:
    """The stacked experts [E, 2I, D] / [E, D, I] as per-expert views (one copy held)."""
    if not name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
        return None
    prefix, _, kind = name.rpartition(".")
    inner = args.moe_intermediate_size
    out = {}
    for index in range(args.num_experts):
        if tensor is None:
            part = {"gate_proj": None, "up_proj": None} if kind == "gate_up_proj" else {
                "down_proj": None}
        elif kind == "gate_up_proj":
            part = {"gate_proj": tensor[index, :inner], "up_proj": tensor[index, inner:]}
        else:
            part = {"down_proj": tensor[index]}
        out.update({f"{prefix}.{index}.{leaf}.weight": value for leaf, value in part.items()})
    return out


def parameter_counts(args: ModelArgs) -> dict:
    hidden, head_dim = args.hidden_size, args.head_dim
    q_width, kv_width = args.num_attention_heads * head_dim, args.num_key_value_heads * head_dim
    channels = args.conv_channels
    groups = args.num_attention_heads + args.num_key_value_heads
    conv = channels * args.cca_time0 + channels * (channels // groups) * args.cca_time1 + 2 * channels
    attn = hidden * (2 * q_width + 2 * kv_width) + conv + args.num_key_value_heads
    width, classes = args.router_hidden_size, args.num_experts + 1
    router = hidden * width + width + 2 * (width * width + width) + width + width * classes
    expert = 3 * hidden * args.moe_intermediate_size
    per_layer = attn + router + classes + 2 * hidden + 8 * hidden
    total = args.num_hidden_layers * (per_layer + args.num_experts * expert)
    total += (args.num_hidden_layers - 1) * width  # router_states_scale from layer 1 on
    active = total - args.num_hidden_layers * (args.num_experts - 1) * expert
    embed = args.vocab_size * hidden
    head = 0 if args.tie_word_embeddings else embed
    extra = embed + head + 3 * hidden
    return {"total": total + extra, "active": active + extra, "embedding": embed,
            "lm_head": head or embed, "experts": args.num_experts, "experts_per_token": 1,
            "expert_bytes_per_layer_fp16": 2 * expert}


def tiny_config(vocab_size: int, special: dict) -> dict:
    """A small config.json with the keys transformers' ZayaConfig writes (ZAYA1-8B's values
    in comments)."""
    return {
        "architectures": ["ZayaForCausalLM"],
        "model_type": "zaya",
        "vocab_size": vocab_size,  # 262272
        "hidden_size": 64,  # 2048
        "num_hidden_layers": 3,  # 40
        "num_attention_heads": 4,  # 8
        "num_key_value_heads": 2,  # 2
        "head_dim": 16,  # 128
        "moe_intermediate_size": 64,  # 2048
        "num_experts": 4,  # 16
        "num_experts_per_tok": 1,
        "router_hidden_size": 32,  # 256
        "cca_time0": 2,
        "cca_time1": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "layer_types": ["hybrid"] * 3,
        "sliding_window": None,
        "rope_parameters": {
            "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0,
                       "partial_rotary_factor": 0.5},
            "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0,
                               "partial_rotary_factor": 0.5},
        },
        "attention_bias": False,
        "lm_head_bias": False,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "use_cache": True,
        "pad_token_id": special["eos"],
        "bos_token_id": special.get("bos"),
        "eos_token_id": special["eos"],
    }


def stack(shapes: dict, args: ModelArgs) -> dict:
    """The checkpoint's tensor shapes from the model's (``make-tiny``): experts stacked."""
    out = {}
    for name, shape in shapes.items():
        prefix, found, rest = name.partition(".mlp.experts.")
        if not found:
            out[name] = shape
            continue
        index, leaf = rest.split(".")[:2]
        if index != "0":
            continue
        hidden, inner = args.hidden_size, args.moe_intermediate_size
        if leaf == "gate_proj":
            out[f"{prefix}.mlp.experts.gate_up_proj"] = (args.num_experts, 2 * inner, hidden)
        elif leaf == "down_proj":
            out[f"{prefix}.mlp.experts.down_proj"] = (args.num_experts, hidden, inner)
    return out


def stack_state(state: dict, args: ModelArgs) -> dict:
    """A state dict in the checkpoint's layout (``expand`` undone): the per-expert weights
    stacked as ``gate_up_proj`` [E, 2I, D] and ``down_proj`` [E, D, I]."""
    out = {}
    for name, tensor in state.items():
        prefix, found, rest = name.partition(".mlp.experts.")
        if not found:
            out[name] = tensor.detach()
            continue
        if not rest.startswith("0.") or ".up_proj." in rest:
            continue
        experts = [f"{prefix}.mlp.experts.{e}" for e in range(args.num_experts)]
        if ".gate_proj." in rest:
            out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
                (state[f"{e}.gate_proj.weight"], state[f"{e}.up_proj.weight"])).detach()
                for e in experts])
        else:
            out[f"{prefix}.mlp.experts.down_proj"] = torch.stack(
                [state[f"{e}.down_proj.weight"].detach() for e in experts])
    return out
