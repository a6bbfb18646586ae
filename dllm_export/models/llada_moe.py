"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base/Instruct): an OLMoE-style bidirectional MoE
transformer with per-head Q/K RMSNorm. Its config says model_type 'llada' too; the MoE keys
tell it apart. Router: softmax in float32 over all experts, top-k, no renormalisation."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch.nn.functional as F
from torch import nn

from dllm_export.errors import DllmExportError
from dllm_export.families import family
from dllm_export.models import config_fields
from dllm_export.models.layers import (
    RMSNorm,
    apply_rope,
    attention,
    attention_bias,
    default_positions,
    rope_tables,
    split_heads,
)
from dllm_export.models.moe import SparseMoeBlock, SwiGLUExpert

SHIFT_LOGITS = family("llada-moe").shift_logits


# LLaDA-MoE uses the Ling tokenizer's role markers; mask 156895 and EOS 156892 in the 7B.
TOKENIZER = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "eot": "<|role_end|>",
    "mask": "<|mdm_mask|>",
    "extra": ["<role>", "</role>"],
    "chat_template": (
        "{% for message in messages %}<role>{{ message['role'] | upper }}</role>"
        "{{ message['content'] }}<|role_end|>{% endfor %}"
        "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
    ),
}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    num_key_value_heads: int | None = None
    dense_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    moe_layer_freq: list | None = None
    qk_layernorm: bool = True
    moe_router_enable_expert_bias: bool | None = None
    moe_router_score_function: str | None = None
    partial_rotary_factor: float | None = None
    rope_theta: float = 50000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    clip_qkv: float | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        required = [f.name for f in fields(cls)][:7]
        for name in required:
            if config.get(name) in (None, -1):
                raise DllmExportError(f"config.json: LLaDA-MoE needs field '{name}'")
        return cls(**config_fields(cls, config))

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.moe_layer_freq in (None, []):
            self.moe_layer_freq = [1] * self.num_hidden_layers
        if len(self.moe_layer_freq) != self.num_hidden_layers:
            raise DllmExportError(
                "config.json: 'moe_layer_freq' must list one entry per layer "
                f"({len(self.moe_layer_freq)} != num_hidden_layers {self.num_hidden_layers})"
            )
        if self.shared_expert_intermediate_size in (-1, 0):
            self.shared_expert_intermediate_size = None
        if self.partial_rotary_factor in (None, -1):
            self.partial_rotary_factor = 1.0
        if self.rope_scaling is not None:
            raise DllmExportError("config.json: 'rope_scaling' is not supported yet (use null)")
        if self.moe_router_score_function not in (None, "softmax"):
            raise DllmExportError(
                f"config.json: moe_router_score_function "
                f"{self.moe_router_score_function!r} is not supported (softmax only)"
            )
        if self.hidden_act != "silu":
            raise DllmExportError(f"config.json: hidden_act {self.hidden_act!r} (silu only)")
        if self.num_experts_per_tok > self.num_experts:
            raise DllmExportError("config.json: num_experts_per_tok exceeds num_experts")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        kv_width = args.num_key_value_heads * args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_width, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, kv_width, bias=args.attention_bias)
        self.o_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=args.attention_bias)
        if args.qk_layernorm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)

    def forward(self, x, cos, sin, bias, cache=None):
        args = self.args
        q = split_heads(self.q_proj(x), args.num_attention_heads)
        k = split_heads(self.k_proj(x), args.num_key_value_heads)
        v = split_heads(self.v_proj(x), args.num_key_value_heads)
        if args.qk_layernorm:  # per head, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        if args.clip_qkv is not None:
            q, k, v = (t.clamp(-args.clip_qkv, args.clip_qkv) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.o_proj(attention(q, k, v, bias))


class DenseMLP(SwiGLUExpert):
    """Layers with moe_layer_freq 0 use a dense SwiGLU with the same names."""


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_index: int):
        super().__init__()
        self.self_attn = Attention(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.is_moe = bool(args.moe_layer_freq[layer_index])
        if self.is_moe:
            self.mlp = SparseMoeBlock(
                args.hidden_size,
                args.expert_intermediate_size,
                args.num_experts,
                args.num_experts_per_tok,
                renormalize=False,  # the reference hard-codes norm_topk_prob = False
                expert_bias=bool(args.moe_router_enable_expert_bias),
            )
            if args.shared_expert_intermediate_size:
                self.shared_expert = SwiGLUExpert(
                    args.hidden_size, args.shared_expert_intermediate_size
                )
        else:
            self.mlp = DenseMLP(args.hidden_size, args.dense_intermediate_size)

    def forward(self, x, cos, sin, bias, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, cache)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(h)
        return x + out


class LLaDAMoEModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(nn.Module):
    """Mask predictor: input_ids [B, Lq] -> float32 logits [B, Lq, V] (see llada.Model for
    ``positions``, ``visible`` and ``cache``)."""

    shift_logits = SHIFT_LOGITS

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LLaDAMoEModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def moe_blocks(self):
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def forward(self, input_ids, attention_mask=None, positions=None, visible=None, cache=None,
                rows=None):
        x = self.model.embed_tokens(input_ids)
        positions = default_positions(input_ids) if positions is None else positions
        cos, sin = rope_tables(positions, self.args.rotary_dim, self.args.rope_theta)
        bias = attention_bias(visible, attention_mask, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, bias, cache)
        if rows is not None:  # the rows the head is computed for (head.RowsDenoiser)
            x = x[:, rows]
        x = self.model.norm(x)
        if self.args.tie_word_embeddings:
            return F.linear(x, self.model.embed_tokens.weight).float()
        return self.lm_head(x).float()


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """Converters often drop the all-zero expert_bias buffer: restore it as zeros."""
    import torch

    if args.moe_router_enable_expert_bias:
        for i, moe in enumerate(args.moe_layer_freq):
            name = f"model.layers.{i}.mlp.expert_bias"
            if moe and name not in weights:
                weights[name] = torch.zeros(args.num_experts)
    return weights


def parameter_counts(args: ModelArgs) -> dict:
    hidden, head_dim = args.hidden_size, args.head_dim
    attn = hidden * (2 * hidden + 2 * args.num_key_value_heads * head_dim)
    attn += 2 * head_dim if args.qk_layernorm else 0
    expert = 3 * hidden * args.expert_intermediate_size
    shared = 3 * hidden * (args.shared_expert_intermediate_size or 0)
    total = active = 0
    for moe in args.moe_layer_freq:
        if moe:
            router = hidden * args.num_experts
            total += attn + router + args.num_experts * expert + shared
            active += attn + router + args.num_experts_per_tok * expert + shared
        else:
            dense = 3 * hidden * args.dense_intermediate_size
            total += attn + dense
            active += attn + dense
        total += 2 * hidden
        active += 2 * hidden
    embed = args.vocab_size * hidden
    head = 0 if args.tie_word_embeddings else embed
    return {
        "total": total + embed + head + hidden,
        "active": active + embed + head + hidden,
        "embedding": embed,
        "lm_head": head or embed,
        "experts": args.num_experts,
        "experts_per_token": args.num_experts_per_tok,
        "expert_bytes_per_layer_fp16": 2 * expert,
    }


def tiny_config(vocab_size: int, special: dict) -> dict:
    """A small config.json with LLaDA-MoE's own keys (the real 7B-A1B values in comments)."""
    return {
        "architectures": ["LLaDAMoEModelLM"],
        "model_type": "llada",
        "vocab_size": vocab_size,  # 157184
        "hidden_size": 64,  # 2048
        "dense_intermediate_size": 256,  # 8192
        "expert_intermediate_size": 32,  # 1024
        "shared_expert_intermediate_size": None,
        "num_hidden_layers": 2,  # 16
        "num_attention_heads": 4,  # 16
        "num_key_value_heads": 4,  # 16
        "num_experts": 8,  # 64
        "num_experts_per_tok": 2,  # 8
        "moe_layer_freq": [1, 1],
        "norm_topk_prob": False,
        "qk_layernorm": True,
        "moe_router_enable_expert_bias": False,
        "moe_router_score_function": "softmax",
        "routed_scaling_factor": 1,
        "partial_rotary_factor": 1,
        "rope_theta": 50000,
        "rope_scaling": None,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
        "attention_bias": False,
        "clip_qkv": None,
        "tie_word_embeddings": False,
        "use_cache": False,
        "router_aux_loss_coef": 0.01,
        "mask_token_id": special["mask"],
        "eos_token_id": special["eos"],
        "pad_token_id": special["eos"],
    }
