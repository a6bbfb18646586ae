"""LLaDA2.0 / LLaDA2.1 (inclusionAI/LLaDA2.0-mini, -flash; LLaDA2.1): a block-diffusion MoE.

Names follow the published checkpoint: ``model.word_embeddings``, per layer a fused
``attention.query_key_value`` (rows: every query head, then the key heads, then the value
heads), ``attention.query_layernorm`` / ``key_layernorm`` (RMSNorm over head_dim, applied
before RoPE), ``attention.dense``, a dense SwiGLU ``mlp`` in the first
``first_k_dense_replace`` layers and then ``mlp.gate`` (sigmoid, group-limited, selection
bias ``mlp.gate.expert_bias``), ``mlp.experts.{j}`` and ``mlp.shared_experts``; ``model.norm``,
``lm_head``. Partial RoPE (the first ``head_dim * partial_rotary_factor`` channels, rotate
half). Trained block-causal (``families.py``); no logit shift.
"""

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
)
from dllm_export.models.moe import GroupLimitedGate, SparseMoeBlock, SwiGLUExpert

SHIFT_LOGITS = family("llada2").shift_logits

# The Ling tokenizer's role markers as in LLaDA2.0-mini (mask 156895, EOS 156892 there);
# the chat template dInfer's tests use.
TOKENIZER = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "eot": "<|role_end|>",
    "mask": "<|mask|>",
    "extra": ["<role>", "</role>"],
    "chat_template": (
        "{% for message in messages %}<role>"
        "{{ {'user': 'HUMAN', 'assistant': 'ASSISTANT', 'system': 'SYSTEM'}"
        "[message['role']] }}</role>{{ message['content'] }}<|role_end|>{% endfor %}"
        "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
    ),
}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    first_k_dense_replace: int = 0
    num_shared_experts: int | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    partial_rotary_factor: float = 1.0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 16384
    use_qk_norm: bool = True
    use_qkv_bias: bool = False
    use_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        for name in [f.name for f in fields(cls)][:8]:
            if config.get(name) is None:
                raise DllmExportError(f"config.json: LLaDA2 needs field '{name}'")
        return cls(**config_fields(cls, config))

    def __post_init__(self):
        if self.num_key_value_heads in (None, 0):
            self.num_key_value_heads = self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.rope_scaling is not None:
            raise DllmExportError("config.json: 'rope_scaling' is not supported yet (use null)")
        if self.hidden_act != "silu":
            raise DllmExportError(f"config.json: hidden_act {self.hidden_act!r} (silu only)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise DllmExportError("config.json: 'num_attention_heads' must divide by "
                                  "'num_key_value_heads'")
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            raise DllmExportError("config.json: 'num_experts' must divide into 'n_group' groups "
                                  "and 'topk_group' must not exceed 'n_group'")
        if self.num_experts_per_tok > self.num_experts:
            raise DllmExportError("config.json: num_experts_per_tok exceeds num_experts")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        rows = (args.num_attention_heads + 2 * args.num_key_value_heads) * args.head_dim
        self.query_key_value = nn.Linear(args.hidden_size, rows, bias=args.use_qkv_bias)
        self.dense = nn.Linear(args.num_attention_heads * args.head_dim, args.hidden_size,
                               bias=args.use_bias)
        if args.use_qk_norm:
            self.query_layernorm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.key_layernorm = RMSNorm(args.head_dim, args.rms_norm_eps)

    def forward(self, x, cos, sin, bias, cache=None):
        args = self.args
        batch, length, _ = x.shape
        heads, kv = args.num_attention_heads, args.num_key_value_heads
        qkv = self.query_key_value(x).view(batch, length, heads + 2 * kv, args.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([heads, kv, kv], dim=2))
        if args.use_qk_norm:  # per head over head_dim, before RoPE
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.dense(attention(q, k, v, bias))


def make_mlp(args: ModelArgs, layer_index: int) -> nn.Module:
    if layer_index < args.first_k_dense_replace:
        return SwiGLUExpert(args.hidden_size, args.intermediate_size)
    shared = None
    if args.num_shared_experts:
        shared = SwiGLUExpert(args.hidden_size,
                              args.moe_intermediate_size * args.num_shared_experts)
    gate = GroupLimitedGate(args.hidden_size, args.num_experts, args.num_experts_per_tok,
                            args.n_group, args.topk_group, args.routed_scaling_factor)
    return SparseMoeBlock(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                          args.num_experts_per_tok, gate=gate, shared=shared)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = make_mlp(args, layer_index)
        self.is_moe = isinstance(self.mlp, SparseMoeBlock)

    def forward(self, x, cos, sin, bias, cache=None):
        x = x + self.attention(self.input_layernorm(x), cos, sin, bias, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(nn.Module):
    """Mask predictor: input_ids [B, Lq] -> float32 logits [B, Lq, V] (see llada.Model for
    ``positions``, ``visible`` and ``cache``); without them a bidirectional canvas."""

    shift_logits = SHIFT_LOGITS

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LLaDA2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def moe_blocks(self):
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def forward(self, input_ids, attention_mask=None, positions=None, visible=None, cache=None):
        x = self.model.word_embeddings(input_ids)
        positions = default_positions(input_ids) if positions is None else positions
        cos, sin = rope_tables(positions, self.args.rotary_dim, self.args.rope_theta)
        bias = attention_bias(visible, attention_mask, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, bias, cache)
        x = self.model.norm(x)
        if self.args.tie_word_embeddings:
            return F.linear(x, self.model.word_embeddings.weight).float()
        return self.lm_head(x).float()


def parameter_counts(args: ModelArgs) -> dict:
    hidden, head_dim = args.hidden_size, args.head_dim
    q_width, kv_width = args.num_attention_heads * head_dim, args.num_key_value_heads * head_dim
    attn = hidden * (q_width + 2 * kv_width) + q_width * hidden
    attn += 2 * head_dim if args.use_qk_norm else 0
    expert = 3 * hidden * args.moe_intermediate_size
    shared = expert * (args.num_shared_experts or 0)
    total = active = 0
    for index in range(args.num_hidden_layers):
        if index < args.first_k_dense_replace:
            dense = 3 * hidden * args.intermediate_size
            total, active = total + attn + dense, active + attn + dense
        else:
            router = hidden * args.num_experts + args.num_experts
            total += attn + router + args.num_experts * expert + shared
            active += attn + router + args.num_experts_per_tok * expert + shared
        total, active = total + 2 * hidden, active + 2 * hidden
    embed = args.vocab_size * hidden
    head = 0 if args.tie_word_embeddings else embed
    return {"total": total + embed + head + hidden, "active": active + embed + head + hidden,
            "embedding": embed, "lm_head": head or embed, "experts": args.num_experts,
            "experts_per_token": args.num_experts_per_tok,
            "expert_bytes_per_layer_fp16": 2 * expert}


def tiny_config(vocab_size: int, special: dict) -> dict:
    """A small config.json with LLaDA2's published keys (LLaDA2.0-mini's values in comments)."""
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "vocab_size": vocab_size,  # 157184
        "hidden_size": 64,  # 2048
        "intermediate_size": 160,  # 5120
        "moe_intermediate_size": 32,  # 512
        "num_hidden_layers": 3,  # 20
        "num_attention_heads": 4,  # 16
        "num_key_value_heads": 2,  # 4
        "head_dim": 16,  # 128
        "first_k_dense_replace": 1,  # 1
        "num_experts": 16,  # 256
        "num_experts_per_tok": 4,  # 8
        "n_group": 4,  # 8
        "topk_group": 2,  # 4
        "num_shared_experts": 1,  # 1
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "router_dtype": "fp32",
        "partial_rotary_factor": 0.5,
        "rotary_dim": 8,  # 64
        "rope_theta": 600000,
        "rope_scaling": None,
        "rms_norm_eps": 1e-06,
        "max_position_embeddings": 16384,
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "use_cache": False,
        "torch_dtype": "bfloat16",
        "pad_token_id": special["eos"],  # the mask and EOS ids come from the tokenizer
    }
