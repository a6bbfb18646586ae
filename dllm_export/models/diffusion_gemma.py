"""DiffusionGemma (google/diffusiongemma-26B-A4B; transformers'
``DiffusionGemmaForBlockDiffusion``): a Gemma-4 MoE backbone run two ways over one set of
weights, a causal encoder over the prompt that writes the key/value cache and a
bidirectional decoder that denoises a canvas over the cached prefix without writing it.

Names follow the checkpoint ``save_pretrained`` writes. The encoder's text weights are tied
to the decoder's, so only ``model.decoder.*`` is stored: ``embed_tokens`` (also the head),
per layer ``self_attn.{q,k,v,o}_proj`` (no ``v_proj`` in full-attention layers: their values
are their keys' projection), ``self_attn.{q,k}_norm``, the seven norms
(``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm{,_2}``,
``post_feedforward_layernorm{,_1,_2}``), the shared ``mlp.{gate,up,down}_proj``, the router
``router.{proj.weight, scale, per_expert_scale}``, the experts stacked as
``experts.gate_up_proj`` [E, 2I, D] and ``experts.down_proj`` [E, D, I] (split into
per-expert views at load: ``expand``) and the buffer ``layer_scalar``; ``norm``; the
decoder-only ``self_conditioning.{pre_norm, gate_proj, up_proj, down_proj}``. The encoder
keeps only its own ``layer_scalar`` buffers (``model.encoder.language_model.layers.{i}``).
The vision tower (``model.encoder.vision_tower.*``, ``model.encoder.embed_vision.*``) is
stored too and not used: this family is text only (``ignored``).

One layer, as Gemma 4 has it: attention between ``input_layernorm`` and
``post_attention_layernorm``; then the shared MLP (``pre_feedforward_layernorm`` ->
``post_feedforward_layernorm_1``) plus the routed experts, whose router reads the residual
and whose experts read ``pre_feedforward_layernorm_2`` of it (-> ``post_feedforward_layernorm_2``);
their sum through ``post_feedforward_layernorm`` is added to the residual, and the whole
stream is scaled by ``layer_scalar``. Attention: per-head RMSNorm of q and k (scale 1, no
1/sqrt(d)), values RMS-normed without a weight; sliding layers (default RoPE, window
``sliding_window``) and full layers (their own head_dim and key/value heads from
``per_layer_config``, proportional RoPE over a quarter of the angles, values = the key
projection before its norm). The head is the tied embedding with ``tanh`` soft-capping;
the embedding is scaled by sqrt(hidden) (rounded to the weight dtype, as transformers does).

Encoder and decoder are the same ``forward`` with positions, a visibility mask and the cache
(contract.py), plus one explicit decoder input: ``self_conditioning``, the soft embeddings
of the previous step's logits (``soft_embeddings``; zeros at the first step). Given it, the
input embeddings go through the self-conditioning module and the decoder's
``layer_scalar`` copies are used; without it, the encoder's. The sliding window narrows the
visibility per layer type: in the encoder a query at p sees keys in (p - window, p]; in the
decoder every canvas key and the cached keys after ``start - window`` (``start``: the
canvas's first position), which is what transformers' sliding cache keeps (the last
window - 1 tokens) and its unmasked decoder attention reads. The commit pass is the encoder
over the accepted canvas with the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from dllm_export.errors import DllmExportError
from dllm_export.models import config_fields
from dllm_export.models.layers import KVCache, apply_rope, attention
from dllm_export.models.moe import SparseMoeBlock

ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
LAYER_TYPES = ("sliding_attention", "full_attention")

# Gemma's markers; DiffusionGemma needs no mask token (its canvas starts as random tokens):
# the tiny tokenizer carries one only because every family's tokenizer spec names one.
TOKENIZER = {
    "bos": "<bos>",
    "eos": "<eos>",
    "eot": "<end_of_turn>",
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
    """``text_config`` of a DiffusionGemma config.json, plus the top level's canvas length."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    layer_types: list | None = None
    per_layer_config: dict | None = None
    sliding_window: int = 512
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    attention_k_eq_v: bool = True
    enable_moe_block: bool = True
    use_bidirectional_attention: str | None = None
    tie_word_embeddings: bool = True
    canvas_length: int = 256

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise DllmExportError("config.json: DiffusionGemma needs the object 'text_config'")
        for name in [f.name for f in fields(cls)][:10]:
            if text.get(name) is None:
                raise DllmExportError(f"config.json: DiffusionGemma needs field "
                                      f"'text_config.{name}'")
        values = config_fields(cls, {**text, "canvas_length": config.get("canvas_length", 256)})
        return cls(**values)

    def __post_init__(self):
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise DllmExportError(f"config.json: text_config.hidden_activation "
                                  f"{self.hidden_activation!r} (gelu_pytorch_tanh only)")
        if self.attention_bias:
            raise DllmExportError("config.json: text_config.attention_bias true is not "
                                  "supported (DiffusionGemma has none)")
        if not self.enable_moe_block:
            raise DllmExportError("config.json: text_config.enable_moe_block false is not "
                                  "supported (the decoder always runs the experts)")
        if self.use_bidirectional_attention is not None:
            raise DllmExportError(
                "config.json: text_config.use_bidirectional_attention "
                f"{self.use_bidirectional_attention!r}: only null (a causal text encoder) "
                "is supported")
        if self.top_k_experts > self.num_experts:
            raise DllmExportError("config.json: text_config.top_k_experts exceeds num_experts")
        if self.layer_types is None:  # transformers' default: every sixth layer full
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers or not set(
                self.layer_types) <= set(LAYER_TYPES):
            raise DllmExportError(
                "config.json: text_config.layer_types must give one of "
                f"{', '.join(LAYER_TYPES)} per layer ({self.num_hidden_layers})")
        if self.layer_types[-1] != "full_attention":
            self.layer_types = [*self.layer_types[:-1], "full_attention"]  # as transformers
        overrides = self.per_layer_config
        if overrides is None:  # transformers' default (global_head_dim 512)
            overrides = {str(i): {"head_dim": 512} for i, kind in enumerate(self.layer_types)
                         if kind == "full_attention"}
        self.layer_shapes = []
        for index in range(self.num_hidden_layers):
            own = overrides.get(str(index)) or overrides.get(f"{index:02d}") or {}
            if not isinstance(own, dict):
                raise DllmExportError(f"config.json: text_config.per_layer_config[{index!r}] "
                                      "must be an object")
            head_dim = own.get("head_dim", self.head_dim)
            kv_heads = own.get("num_key_value_heads", self.num_key_value_heads)
            if self.num_attention_heads % kv_heads:
                raise DllmExportError(
                    f"config.json: layer {index}: num_attention_heads must divide by "
                    "num_key_value_heads")
            self.layer_shapes.append((head_dim, kv_heads))
        rope = self.rope_parameters or {}
        self.rope = {}
        for kind in set(self.layer_types):
            params = rope.get(kind) or (
                {"rope_type": "default", "rope_theta": 10_000.0} if kind == "sliding_attention"
                else {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                      "rope_theta": 1_000_000.0})
            if params.get("rope_type", "default") not in ("default", "proportional"):
                raise DllmExportError(f"config.json: rope_parameters.{kind}.rope_type "
                                      f"{params.get('rope_type')!r} (default or proportional)")
            self.rope[kind] = params

    def kv_shared(self, index: int) -> bool:
        """Full-attention layers' values are their key projection (no ``v_proj``)."""
        return self.attention_k_eq_v and self.layer_types[index] == "full_attention"


def inverse_frequencies(args: ModelArgs, kind: str, head_dim: int) -> list[float]:
    """One angle rate per channel pair (i, i + head_dim / 2), as transformers' rope init:
    ``default`` over ``partial_rotary_factor`` of the head, ``proportional`` over that share
    of the angles with exponents over the whole head and the rest zero (not rotated)."""
    params = args.rope[kind]
    theta, share = float(params["rope_theta"]), params.get("partial_rotary_factor", 1.0)
    if params.get("rope_type", "default") == "default":
        dim = int(head_dim * share)
        return [1.0 / theta ** (i / dim) for i in range(0, dim, 2)]
    angles = int(share * head_dim // 2)
    rotated = [1.0 / theta ** (i / head_dim) for i in range(0, 2 * angles, 2)]
    return [value / params.get("factor", 1.0)
            for value in rotated + [0.0] * (head_dim // 2 - angles)]


def rope_tables(positions, inv_freq: list[float]):
    """cos/sin [B, 1, L, 2 * len(inv_freq)] in float32."""
    rates = torch.tensor(inv_freq, dtype=torch.float32, device=positions.device)
    freqs = positions.float()[..., None] * rates
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos(), angles.sin()


class RMSNorm(nn.Module):
    """Gemma 4's: x * (mean(x^2) + eps)^-0.5 times ``weight`` (none: ``with_scale=False``),
    computed in float32 and cast back."""

    def __init__(self, size: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = nn.Parameter(torch.ones(size))
        else:
            self.weight = None

    def forward(self, x):
        y = x.float()
        y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.head_dim, self.kv_heads = args.layer_shapes[index]
        self.heads = args.num_attention_heads
        hidden = args.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = (None if args.kv_shared(index)
                       else nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False))
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, args.rms_norm_eps, with_scale=False)

    def forward(self, x, cos, sin, bias, cache=None):
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, length, self.heads, self.head_dim))
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim)
        v = k if self.v_proj is None else self.v_proj(x).view(batch, length, self.kv_heads,
                                                              self.head_dim)
        k, v = self.k_norm(k), self.v_norm(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # scaling 1 (q and k are RMS-normed): pre-scale q by sqrt(d) against SDPA's 1/sqrt(d)
        return self.o_proj(attention(q * self.head_dim ** 0.5, k, v, bias))


class Router(nn.Module):
    """Gemma 4's router: RMS norm (no weight) times ``scale`` / sqrt(hidden), ``proj``,
    softmax in float32, top-k by probability, renormalised, times ``per_expert_scale`` of
    the chosen experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.top_k_experts
        self.root = args.hidden_size ** -0.5
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(args.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(args.num_experts))

    def route(self, x):
        """x [T, D] -> (weights [T, k] float32, expert ids [T, k])."""
        probs = torch.softmax(self.proj(self.norm(x) * self.scale * self.root).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale.float()[ids], ids


class Layer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, index)
        self.mlp = GatedMLP(hidden, args.intermediate_size)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(hidden, eps))
        # checkpoint names ``router.*`` and ``experts.*``, held here as moe.gate and
        # moe.experts.{j} (``expand``)
        self.moe = SparseMoeBlock(hidden, args.moe_intermediate_size, args.num_experts,
                                  args.top_k_experts, gate=Router(args),
                                  activation="gelu_pytorch_tanh")
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x, cos, sin, bias, scalar, cache=None):
        residual = x
        x = self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, bias, cache))
        x = residual + x
        residual = x
        shared = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        routed = self.moe.gate.route(flat)
        experts = self.moe(self.pre_feedforward_layernorm_2(flat), routed=routed)
        experts = self.post_feedforward_layernorm_2(experts.view(x.shape))
        x = residual + self.post_feedforward_layernorm(shared + experts)
        return x * scalar


class SelfConditioning(nn.Module):
    """post_norm(embeddings + MLP(pre_norm(signal))), post_norm without a weight."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden, inner = args.hidden_size, args.intermediate_size
        self.pre_norm = RMSNorm(hidden, args.rms_norm_eps)
        self.post_norm = RMSNorm(hidden, args.rms_norm_eps, with_scale=False)
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, embeddings, signal):
        normed = self.pre_norm(signal)
        return self.post_norm(
            embeddings + self.down_proj(gelu_tanh(self.gate_proj(normed)) * self.up_proj(normed)))


class Decoder(nn.Module):
    """``model.decoder``: every text weight (the encoder's are tied to these)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Layer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("layer_scalar", torch.ones(1))


class EncoderText(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = nn.ModuleList(Scalar() for _ in range(args.num_hidden_layers))


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.language_model = EncoderText(args)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)


def causal_visibility(attention_mask, length: int, device):
    """[B, L, L]: k <= q among real tokens, and every query sees itself."""
    index = torch.arange(length, device=device)
    causal = index[None, :] <= index[:, None]
    if attention_mask is None:
        return causal[None]
    real = attention_mask.to(torch.bool)[:, None, :]
    return (causal[None] & real) | torch.eye(length, dtype=torch.bool, device=device)[None]


class Model(nn.Module):
    """input_ids [B, Lq] -> soft-capped float32 logits [B, Lq, V], row p predicting p.

    Encoder (``self_conditioning`` None): causal over the prompt, or with ``positions``,
    ``visible`` [B, Lq, C + Lq] and ``cache`` a cached call whose ``cache.presents`` are the
    keys and values to write (prefill, and the commit pass over an accepted canvas).
    Decoder (``self_conditioning`` [B, Lq, D], ``soft_embeddings`` of the previous step's
    logits or zeros): bidirectional by default; its presents are not written by anyone.
    Positions are cache slots (slot j holds position j)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.embed_scale = args.hidden_size ** 0.5

    def moe_blocks(self):
        return [layer.moe for layer in self.model.decoder.layers]

    def embed(self, input_ids):
        table = self.model.decoder.embed_tokens.weight
        scale = torch.tensor(self.embed_scale, dtype=table.dtype)
        return F.embedding(input_ids, table) * scale.to(table.device)

    def soft_embeddings(self, logits):
        """softmax(logits) x the embedding x its scale: the self-conditioning signal."""
        table = self.model.decoder.embed_tokens.weight
        probs = torch.softmax(logits.float(), dim=-1).to(table.dtype)
        scale = torch.tensor(self.embed_scale, dtype=table.dtype, device=table.device)
        return torch.matmul(probs, table) * scale

    def forward(self, input_ids, attention_mask=None, positions=None, visible=None,
                cache=None, self_conditioning=None):
        args = self.args
        decoder = self_conditioning is not None
        batch, length = input_ids.shape
        device = input_ids.device
        x = self.embed(input_ids)
        if decoder:
            x = self.model.decoder.self_conditioning(x, self_conditioning.to(x.dtype))
        if positions is None:
            positions = torch.arange(length, device=device)[None].expand(batch, -1)
        if visible is None:
            if decoder:
                real = (torch.ones(batch, length, dtype=torch.bool, device=device)
                        if attention_mask is None else attention_mask.to(torch.bool))
                visible = real[:, None, :].expand(batch, length, length)
            else:
                visible = causal_visibility(attention_mask, length, device)
        visible = visible.to(torch.bool)
        past = visible.shape[-1] - length
        key_positions = positions
        if past:
            slots = torch.arange(past, device=device)[None].expand(batch, -1)
            key_positions = torch.cat((slots, positions), dim=1)
        window = args.sliding_window
        if decoder:  # the canvas, and the cached keys transformers' sliding cache keeps
            start = positions.min(dim=1, keepdim=True).values
            own = torch.arange(past + length, device=device) >= past
            near = own[None, None, :] | (key_positions > start - window)[:, None, :]
        else:
            near = positions[:, :, None] - key_positions[:, None, :] < window
        zero = torch.zeros((), dtype=x.dtype, device=device)
        low = torch.finfo(x.dtype).min
        biases = {"full_attention": torch.where(visible[:, None], zero, low),
                  "sliding_attention": torch.where((visible & near)[:, None], zero, low)}
        tables = {}
        scalars = (self.model.decoder.layers if decoder
                   else self.model.encoder.language_model.layers)
        for index, layer in enumerate(self.model.decoder.layers):
            kind = args.layer_types[index]
            head_dim = args.layer_shapes[index][0]
            if (kind, head_dim) not in tables:
                tables[kind, head_dim] = rope_tables(
                    positions, inverse_frequencies(args, kind, head_dim))
            cos, sin = tables[kind, head_dim]
            x = layer(x, cos, sin, biases[kind], scalars[index].layer_scalar.to(x.dtype), cache)
        x = self.model.decoder.norm(x)
        logits = F.linear(x, self.model.decoder.embed_tokens.weight).float()
        cap = args.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def encode(self, input_ids, positions, visible, cache: KVCache):
        """The encoder over a chunk (prefill or commit): logits; keys/values in cache."""
        return self(input_ids, positions=positions, visible=visible, cache=cache)

    def denoise(self, canvas, positions, visible, cache: KVCache, previous_logits=None):
        """One decoder step over ``canvas`` (zero signal without ``previous_logits``)."""
        if previous_logits is None:
            signal = torch.zeros(*canvas.shape, self.args.hidden_size,
                                 dtype=self.model.decoder.embed_tokens.weight.dtype,
                                 device=canvas.device)
        else:
            signal = self.soft_embeddings(previous_logits)
        return self(canvas, positions=positions, visible=visible, cache=cache,
                    self_conditioning=signal)


# ---- the checkpoint layout ------------------------------------------------------------

IGNORED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


def ignored(name: str) -> bool:
    """Stored tensors the text model does not use (the vision tower and its projection)."""
    return name.startswith(IGNORED_PREFIXES)


def expand(name: str, tensor, args: ModelArgs) -> dict | None:
    """Checkpoint names to the model's: ``router.*`` -> ``moe.gate.*``, the stacked experts
    [E, 2I, D] / [E, D, I] -> per-expert views (one copy held)."""
    prefix, found, rest = name.partition(".router.")
    if found:
        return {f"{prefix}.moe.gate.{rest}": tensor}
    if not name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return None
    prefix, _, kind = name.rpartition(".experts.")
    inner = args.moe_intermediate_size
    out = {}
    for index in range(args.num_experts):
        if tensor is None:
            part = ({"gate_proj": None, "up_proj": None} if kind == "gate_up_proj"
                    else {"down_proj": None})
        elif kind == "gate_up_proj":
            part = {"gate_proj": tensor[index, :inner], "up_proj": tensor[index, inner:]}
        else:
            part = {"down_proj": tensor[index]}
        out.update({f"{prefix}.moe.experts.{index}.{leaf}.weight": value
                    for leaf, value in part.items()})
    return out


def vision_shapes(vision: dict, text_hidden: int) -> dict:
    """The Gemma 4 vision tower's stored tensors (``make-tiny`` writes them so that the
    checkpoint is complete for transformers; this family never reads them)."""
    hidden, inner = vision["hidden_size"], vision["intermediate_size"]
    heads, kv_heads = vision["num_attention_heads"], vision["num_key_value_heads"]
    head_dim, patch = vision["head_dim"], vision.get("patch_size", 16)
    base = "model.encoder.vision_tower."
    out = {f"{base}patch_embedder.input_proj.weight": (hidden, 3 * patch * patch),
           f"{base}patch_embedder.position_embedding_table":
               (2, vision.get("position_embedding_size", 10240), hidden)}
    for i in range(vision["num_hidden_layers"]):
        layer = f"{base}encoder.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            out[f"{layer}{norm}.weight"] = (hidden,)
        out[f"{layer}mlp.gate_proj.linear.weight"] = (inner, hidden)
        out[f"{layer}mlp.up_proj.linear.weight"] = (inner, hidden)
        out[f"{layer}mlp.down_proj.linear.weight"] = (hidden, inner)
        out[f"{layer}self_attn.q_proj.linear.weight"] = (heads * head_dim, hidden)
        out[f"{layer}self_attn.k_proj.linear.weight"] = (kv_heads * head_dim, hidden)
        out[f"{layer}self_attn.v_proj.linear.weight"] = (kv_heads * head_dim, hidden)
        out[f"{layer}self_attn.o_proj.linear.weight"] = (hidden, heads * head_dim)
        out[f"{layer}self_attn.q_norm.weight"] = (head_dim,)
        out[f"{layer}self_attn.k_norm.weight"] = (head_dim,)
    out["model.encoder.embed_vision.embedding_projection.weight"] = (text_hidden, hidden)
    return out


def stack(shapes: dict, args: ModelArgs) -> dict:
    """The checkpoint's tensor shapes from the model's (``make-tiny``): router names and
    the experts stacked (``stack_state`` on meta tensors)."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    return {name: tuple(t.shape) for name, t in stack_state(meta, args).items()}


def stack_state(state: dict, args: ModelArgs) -> dict:
    """A state dict of this model in the checkpoint's layout: ``moe.gate`` as ``router``,
    the per-expert weights stacked as ``experts.gate_up_proj`` [E, 2I, D] and
    ``experts.down_proj`` [E, D, I]."""
    out = {}
    for name, tensor in state.items():
        prefix, found, rest = name.partition(".moe.gate.")
        if found:
            out[f"{prefix}.router.{rest}"] = tensor.detach()
            continue
        prefix, found, rest = name.partition(".moe.experts.")
        if not found:
            out[name] = tensor.detach()
            continue
        index, leaf = rest.split(".")[:2]
        if index != "0" or leaf == "up_proj":
            continue
        experts = [f"{prefix}.moe.experts.{j}" for j in range(args.num_experts)]
        if leaf == "gate_proj":
            out[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat((
                state[f"{e}.gate_proj.weight"], state[f"{e}.up_proj.weight"])).detach()
                for e in experts])
        else:
            out[f"{prefix}.experts.down_proj"] = torch.stack(
                [state[f"{e}.down_proj.weight"].detach() for e in experts])
    return out


def unused_shapes(config: dict, args: ModelArgs) -> dict:
    """The stored tensors ``ignored`` skips (``make-tiny``: the vision tower)."""
    vision = config.get("vision_config")
    return vision_shapes(vision, args.hidden_size) if isinstance(vision, dict) else {}


def parameter_counts(args: ModelArgs) -> dict:
    """Parameters of the text model (the vision tower left out; ``layer_scalar`` is a
    buffer, as in transformers)."""
    hidden, heads = args.hidden_size, args.num_attention_heads
    expert = 3 * hidden * args.moe_intermediate_size
    total = 0
    for index, (head_dim, kv_heads) in enumerate(args.layer_shapes):
        kv = (1 if args.kv_shared(index) else 2) * kv_heads * head_dim
        attention_ = hidden * (2 * heads * head_dim + kv) + 2 * head_dim
        router = hidden * args.num_experts + hidden + args.num_experts
        total += (attention_ + 3 * hidden * args.intermediate_size + router
                  + args.num_experts * expert + 7 * hidden)
    active = total - args.num_hidden_layers * (args.num_experts - args.top_k_experts) * expert
    embed = args.vocab_size * hidden
    extra = embed + hidden + (hidden + 3 * hidden * args.intermediate_size)  # norm, self-cond.
    return {"total": total + extra, "active": active + extra, "embedding": embed,
            "lm_head": embed, "experts": args.num_experts,
            "experts_per_token": args.top_k_experts, "expert_bytes_per_layer_fp16": 2 * expert}


def tiny_generation(special: dict) -> dict:
    """generation_config.json with the keys ``DiffusionGemmaGenerationConfig`` takes (its
    defaults; it refuses any other key, such as a mask token id)."""
    return {"bos_token_id": special.get("bos"), "eos_token_id": special["eos"],
            "pad_token_id": special["eos"], "max_denoising_steps": 48, "t_min": 0.4,
            "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005}


def tiny_config(vocab_size: int, special: dict) -> dict:
    """A small config.json with the keys transformers' ``DiffusionGemmaConfig`` writes
    (26B-A4B's values in comments): two sliding layers and a full one, so that both layer
    kinds, the shared key/value projection and a window shorter than the prompt are used."""
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "diffusion_gemma",
        "boi_token_id": vocab_size - 3,
        "eoi_token_id": vocab_size - 2,
        "image_token_id": vocab_size - 1,
        "canvas_length": 16,  # 256
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "diffusion_gemma_text",
            "vocab_size": vocab_size,  # 262144
            "hidden_size": 64,  # 2816
            "intermediate_size": 96,  # 2112
            "num_hidden_layers": 4,  # 30
            "num_attention_heads": 4,  # 16
            "num_key_value_heads": 2,  # 8
            "head_dim": 16,  # 256
            "per_layer_config": {str(i): {"head_dim": 32, "num_key_value_heads": 1}
                                 for i, kind in enumerate(layer_types)
                                 if kind == "full_attention"},  # 512, 2
            "layer_types": layer_types,  # 5 sliding : 1 full
            "sliding_window": 8,  # 1024
            "num_experts": 8,  # 128
            "top_k_experts": 2,  # 8
            "moe_intermediate_size": 32,  # 704
            "enable_moe_block": True,
            "attention_k_eq_v": True,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": 30.0,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0,
                                   "rope_type": "proportional"},
                "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"},
            },
            "max_position_embeddings": 4096,  # 262144
            "use_bidirectional_attention": None,
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
            "pad_token_id": special["eos"],
            "bos_token_id": special.get("bos"),
            "eos_token_id": special["eos"],
        },
        "vision_config": {
            "model_type": "gemma4_vision",
            "hidden_size": 16,  # 768
            "intermediate_size": 32,  # 3072
            "num_hidden_layers": 1,  # 16
            "num_attention_heads": 2,  # 12
            "num_key_value_heads": 2,
            "head_dim": 8,  # 64
            "hidden_activation": "gelu_pytorch_tanh",
            "patch_size": 16,
            "pooling_kernel_size": 3,
            "position_embedding_size": 10240,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"},
            "standardize": False,
            "use_clipped_linears": False,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
        },
    }
