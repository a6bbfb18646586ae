"""LLaDA (GSAI-ML/LLaDA-8B-Base, -Instruct, LLaDA-1.5): an OLMo-style bidirectional
transformer. Parameter names follow the checkpoint: ``model.transformer.blocks.{i}.q_proj``."""

from __future__ import annotations

from dataclasses import dataclass

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

SHIFT_LOGITS = family("llada").shift_logits


# Special tokens and chat template as in GSAI-ML/LLaDA-8B-Instruct's tokenizer_config.json.
TOKENIZER = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "eot": "<|eot_id|>",
    "mask": "<|mdm_mask|>",
    "extra": ["<|start_header_id|>", "<|end_header_id|>"],
    "chat_template": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
}


@dataclass
class ModelArgs:
    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    n_kv_heads: int | None = None
    mlp_hidden_size: int | None = None
    mlp_ratio: int = 4
    embedding_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    multi_query_attention: bool | None = None
    rope_full_precision: bool = True
    # Architectural switches the original code supports; only the LLaDA setting is accepted.
    block_type: str = "llama"
    layer_norm_type: str = "rms"
    activation_type: str = "silu"
    rope: bool = True
    alibi: bool = False
    attention_layer_norm: bool = False
    scale_logits: bool = False
    input_emb_norm: bool = False

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        missing = [name for name in ("d_model", "n_heads", "n_layers", "vocab_size") if name not in config]
        if missing:
            raise DllmExportError(f"config.json: LLaDA needs field '{missing[0]}'")
        return cls(**config_fields(cls, config))

    def __post_init__(self):
        required = {
            "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu",
            "rope": True, "alibi": False, "attention_layer_norm": False,
            "scale_logits": False, "input_emb_norm": False,
        }
        for name, value in required.items():
            if getattr(self, name) != value:
                raise DllmExportError(
                    f"config.json: field '{name}' = {getattr(self, name)!r} is not supported "
                    f"for LLaDA (expected {value!r})"
                )
        if self.multi_query_attention:
            self.n_kv_heads = 1
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.mlp_hidden_size = self.mlp_hidden_size or self.mlp_ratio * self.d_model
        self.embedding_size = self.embedding_size or self.vocab_size
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise DllmExportError(
                "config.json: 'd_model' must divide by 'n_heads' and 'n_heads' by 'n_kv_heads'"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class LLaDABlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        kv_width = args.n_kv_heads * args.head_dim
        qkv_bias = args.include_bias or args.include_qkv_bias
        self.attn_norm = RMSNorm(args.d_model, args.rms_norm_eps)
        self.q_proj = nn.Linear(args.d_model, args.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(args.d_model, kv_width, bias=qkv_bias)
        self.v_proj = nn.Linear(args.d_model, kv_width, bias=qkv_bias)
        self.attn_out = nn.Linear(args.d_model, args.d_model, bias=args.include_bias)
        self.ff_norm = RMSNorm(args.d_model, args.rms_norm_eps)
        self.ff_proj = nn.Linear(args.d_model, args.mlp_hidden_size, bias=args.include_bias)
        self.up_proj = nn.Linear(args.d_model, args.mlp_hidden_size, bias=args.include_bias)
        self.ff_out = nn.Linear(args.mlp_hidden_size, args.d_model, bias=args.include_bias)

    def forward(self, x, cos, sin, bias, cache=None):
        h = self.attn_norm(x)
        q = split_heads(self.q_proj(h), self.args.n_heads)
        k = split_heads(self.k_proj(h), self.args.n_kv_heads)
        v = split_heads(self.v_proj(h), self.args.n_kv_heads)
        full = self.args.rope_full_precision
        q, k = apply_rope(q, cos, sin, full), apply_rope(k, cos, sin, full)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        x = x + self.attn_out(attention(q, k, v, bias))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.wte = nn.Embedding(args.embedding_size, args.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(args) for _ in range(args.n_layers))
        self.ln_f = RMSNorm(args.d_model, args.rms_norm_eps)
        if not args.weight_tying:
            self.ff_out = nn.Linear(args.d_model, args.embedding_size, bias=args.include_bias)


class LLaDAModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.transformer = Transformer(args)


class Model(nn.Module):
    """Mask predictor: input_ids [B, Lq] -> float32 logits [B, Lq, V], row r predicting
    query r. ``positions`` [B, Lq] (RoPE), ``visible`` [B, Lq, K] and ``cache`` (a
    ``KVCache``) make it a cached or causal call; without them it is the full canvas with
    ``attention_mask`` [B, L] hiding left padding."""

    shift_logits = SHIFT_LOGITS

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LLaDAModel(args)

    def forward(self, input_ids, attention_mask=None, positions=None, visible=None, cache=None,
                rows=None):
        transformer = self.model.transformer
        x = transformer.wte(input_ids)
        # LLaDA keeps absolute positions under left padding; padded keys are masked out.
        positions = default_positions(input_ids) if positions is None else positions
        cos, sin = rope_tables(positions, self.args.head_dim, self.args.rope_theta)
        bias = attention_bias(visible, attention_mask, x.dtype)
        for block in transformer.blocks:
            x = block(x, cos, sin, bias, cache)
        if rows is not None:  # the rows the head is computed for (head.RowsDenoiser)
            x = x[:, rows]
        x = transformer.ln_f(x)
        if self.args.weight_tying:
            return F.linear(x, transformer.wte.weight).float()
        return transformer.ff_out(x).float()


def parameter_counts(args: ModelArgs) -> dict:
    attn = args.d_model * (2 * args.d_model + 2 * args.n_kv_heads * args.head_dim)
    mlp = 3 * args.d_model * args.mlp_hidden_size
    per_layer = attn + mlp + 2 * args.d_model
    embed = args.embedding_size * args.d_model
    head = 0 if args.weight_tying else embed
    total = args.n_layers * per_layer + embed + head + args.d_model
    return {"total": total, "active": total, "embedding": embed, "lm_head": head or embed}


def tiny_config(vocab_size: int, special: dict) -> dict:
    """A small config.json with LLaDA's own keys (the real 8B values in comments)."""
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "block_type": "llama",
        "d_model": 64,  # 4096
        "n_heads": 4,  # 32
        "n_kv_heads": 4,  # 32
        "n_layers": 2,  # 32
        "mlp_hidden_size": 192,  # 12288
        "mlp_ratio": 4,
        "embedding_size": vocab_size,  # 126464
        "vocab_size": vocab_size,
        "include_bias": False,
        "include_qkv_bias": False,
        "layer_norm_type": "rms",
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "max_sequence_length": 4096,
        "weight_tying": False,
        "mask_token_id": special["mask"],
        "eos_token_id": special["eos"],
        "pad_token_id": special["eos"],
        "use_cache": False,
        "precision": "amp_bf16",
    }
