"""Dream (Dream-org/Dream-v0-Base-7B, -Instruct-7B): a Qwen2.5 layout run bidirectionally.

Dream keeps its autoregressive initialisation's shift: the prediction for position p is
read from output row p-1 (row 0 for p = 0). ``Model.forward`` returns the rows as computed
(``shift_logits``); ``head.canvas_logits`` applies the shift for a full canvas, and a cached
call feeds the window one position early so that its rows predict the block."""

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
from dllm_export.models.moe import SwiGLUExpert

SHIFT_LOGITS = family("dream").shift_logits


# Qwen2.5's special tokens plus Dream's <|mask|> (151666 in the 7B); Qwen's chat template.
TOKENIZER = {
    "bos": "<|endoftext|>",
    "eos": "<|endoftext|>",
    "eot": "<|im_end|>",
    "mask": "<|mask|>",
    "extra": ["<|im_start|>"],
    "chat_template": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
        "assistant.<|im_end|>\n{% endif %}{% for message in messages %}<|im_start|>"
        "{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        for name in [f.name for f in fields(cls)][:5]:
            if name not in config:
                raise DllmExportError(f"config.json: Dream needs field '{name}'")
        return cls(**config_fields(cls, config))

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.rope_scaling is not None:
            raise DllmExportError("config.json: 'rope_scaling' is not supported yet (use null)")
        if self.use_sliding_window:
            raise DllmExportError("config.json: 'use_sliding_window' true is not supported")
        if self.hidden_act != "silu":
            raise DllmExportError(f"config.json: hidden_act {self.hidden_act!r} (silu only)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        kv_width = args.num_key_value_heads * args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)
        self.k_proj = nn.Linear(args.hidden_size, kv_width, bias=True)
        self.v_proj = nn.Linear(args.hidden_size, kv_width, bias=True)
        self.o_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=False)

    def forward(self, x, cos, sin, bias, cache=None):
        q = split_heads(self.q_proj(x), self.args.num_attention_heads)
        k = split_heads(self.k_proj(x), self.args.num_key_value_heads)
        v = split_heads(self.v_proj(x), self.args.num_key_value_heads)
        q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.o_proj(attention(q, k, v, bias))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = SwiGLUExpert(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, bias, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(nn.Module):
    """input_ids [B, Lq] -> float32 logits [B, Lq, V]; row r predicts the position after
    query r (see the module doc, and llada.Model for ``positions``, ``visible``, ``cache``)."""

    shift_logits = SHIFT_LOGITS

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DreamBaseModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, positions=None, visible=None, cache=None,
                rows=None):
        x = self.model.embed_tokens(input_ids)
        if positions is None and attention_mask is None:
            positions = default_positions(input_ids)
        elif positions is None:  # Dream numbers real tokens from 0 under left padding; pads get 1
            # float cumsum: TensorRT's CumSum takes no int64 (exact below 2**24 tokens)
            positions = attention_mask.float().cumsum(-1).long() - 1
            positions = positions.masked_fill(attention_mask == 0, 1)
        cos, sin = rope_tables(positions, self.args.head_dim, self.args.rope_theta)
        bias = attention_bias(visible, attention_mask, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, bias, cache)
        if rows is not None:  # the rows the head is computed for (head.RowsDenoiser)
            x = x[:, rows]
        x = self.model.norm(x)
        if self.args.tie_word_embeddings:
            return F.linear(x, self.model.embed_tokens.weight).float()
        return self.lm_head(x).float()


def parameter_counts(args: ModelArgs) -> dict:
    hidden, kv_width = args.hidden_size, args.num_key_value_heads * args.head_dim
    attn = hidden * (2 * hidden + 2 * kv_width) + hidden + 2 * kv_width
    per_layer = attn + 3 * hidden * args.intermediate_size + 2 * hidden
    embed = args.vocab_size * hidden
    head = 0 if args.tie_word_embeddings else embed
    total = args.num_hidden_layers * per_layer + embed + head + hidden
    return {"total": total, "active": total, "embedding": embed, "lm_head": head or embed}


def tiny_config(vocab_size: int, special: dict) -> dict:
    """A small config.json with Dream's own keys (the real 7B values in comments)."""
    return {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "vocab_size": vocab_size,  # 152064
        "hidden_size": 64,  # 3584
        "intermediate_size": 160,  # 18944
        "num_hidden_layers": 2,  # 28
        "num_attention_heads": 4,  # 28
        "num_key_value_heads": 2,  # 4
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "use_cache": False,
        "attention_dropout": 0.0,
        "mask_token_id": special["mask"],
        "pad_token_id": special["eos"],
        "bos_token_id": special["eos"],
        "eos_token_id": special["eos"],
        "torch_dtype": "bfloat16",
    }
