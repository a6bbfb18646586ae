"""Independent formulations of each family built from transformers' own classes.

LLaDA is a Llama, Dream a Qwen2 and LLaDA-MoE a Qwen3-MoE with norm_topk_prob=False, each
made bidirectional by clearing ``is_causal`` and passing a 4-D key-padding mask (transformers
passes 4-D masks through unchanged). Weights are remapped from our checkpoint names.
"""

from __future__ import annotations

import re

import torch


def _bidirectional(model):
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model


def _mask4d(attention_mask, batch, length):
    """Additive float mask: eager attention adds it to the scores (a bool mask would be
    added as 0/1 and hide nothing)."""
    if attention_mask is None:
        return torch.zeros(batch, 1, length, length)
    keep = attention_mask.bool()[:, None, None, :].expand(batch, 1, length, length)
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def llada_reference(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    config = LlamaConfig(
        vocab_size=a.embedding_size, hidden_size=a.d_model, intermediate_size=a.mlp_hidden_size,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads, rms_norm_eps=a.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        max_position_embeddings=a.max_sequence_length, tie_word_embeddings=False,
        attention_bias=False, attn_implementation="eager",
    )
    names = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj",
             "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
             "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
             "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    state = {}
    for name, tensor in model.state_dict().items():
        m = re.match(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.weight", name)
        if m:
            state[f"model.layers.{m[1]}.{names[m[2]]}.weight"] = tensor
        elif name == "model.transformer.wte.weight":
            state["model.embed_tokens.weight"] = tensor
        elif name == "model.transformer.ln_f.weight":
            state["model.norm.weight"] = tensor
        elif name == "model.transformer.ff_out.weight":
            state["lm_head.weight"] = tensor
    ref = LlamaForCausalLM(config)
    ref.load_state_dict(state, strict=True)
    return _bidirectional(ref.eval())


def dream_reference(model):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    a = model.args
    config = Qwen2Config(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads, rms_norm_eps=a.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        tie_word_embeddings=False, attn_implementation="eager",
    )
    ref = Qwen2ForCausalLM(config)
    ref.load_state_dict(model.state_dict(), strict=True)
    return _bidirectional(ref.eval())


def llada_moe_reference(model):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    a = model.args
    config = Qwen3MoeConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size,
        moe_intermediate_size=a.expert_intermediate_size,
        intermediate_size=a.dense_intermediate_size or a.expert_intermediate_size,
        num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim,
        num_experts=a.num_experts, num_experts_per_tok=a.num_experts_per_tok,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        rms_norm_eps=a.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        tie_word_embeddings=False, attn_implementation="eager",
    )
    state = {}
    experts: dict = {}
    for name, tensor in model.state_dict().items():
        m = re.match(r"(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(\w+)\.weight", name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = tensor
        else:
            state[name] = tensor
    for prefix, by_index in experts.items():
        order = sorted(by_index)
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([by_index[i]["gate_proj"], by_index[i]["up_proj"]]) for i in order])
        state[f"{prefix}.experts.down_proj"] = torch.stack(
            [by_index[i]["down_proj"] for i in order])
    ref = Qwen3MoeForCausalLM(config)
    ref.load_state_dict(state, strict=True)
    return _bidirectional(ref.eval())


def causal_reference(family, model):
    """The transformers class of ``family`` on our weights, left causal as it ships: the
    independent reference for the causal mode of our forward (autoregressive decoding)."""
    builder = {"llada": llada_reference, "dream": dream_reference,
               "llada-moe": llada_moe_reference}[family]
    ref = builder(model)
    for module in ref.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = True
    return ref


def reference_logits(family, model, input_ids, attention_mask=None):
    """Logits of the transformers reference, aligned like ours (Dream shifted)."""
    builder = {"llada": llada_reference, "dream": dream_reference,
               "llada-moe": llada_moe_reference}[family]
    ref = builder(model)
    batch, length = input_ids.shape
    kwargs = {"attention_mask": _mask4d(attention_mask, batch, length)}
    if family == "dream" and attention_mask is not None:
        positions = attention_mask.long().cumsum(-1) - 1
        kwargs["position_ids"] = positions.masked_fill(attention_mask == 0, 1)
    with torch.no_grad():
        logits = ref(input_ids=input_ids, **kwargs).logits.float()
    if family == "dream":
        logits = torch.cat((logits[:, :1], logits[:, :-1]), dim=1)
    return logits


# ---------------------------------------------------------------- LLaDA2


def deepseek_v3_moe(block, args):
    """transformers' ``DeepseekV3MoE`` (router, stacked experts, shared expert) carrying the
    weights of one of our LLaDA2 MoE blocks: the same routing rule and mixing, written by
    someone else."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
        n_routed_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok,
        n_group=args.n_group, topk_group=args.topk_group, norm_topk_prob=True,
        routed_scaling_factor=args.routed_scaling_factor,
        n_shared_experts=args.num_shared_experts or 1, hidden_act="silu")
    moe = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        moe.gate.weight.copy_(block.gate.weight.float())
        moe.gate.e_score_correction_bias.copy_(block.gate.expert_bias.float())
        moe.experts.gate_up_proj.copy_(torch.stack(
            [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in block.experts]))
        moe.experts.down_proj.copy_(torch.stack([e.down_proj.weight for e in block.experts]))
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(moe.shared_experts, name).weight.copy_(
                getattr(block.shared_experts, name).weight)
    return moe


def llada2_reference_logits(model, input_ids, bias=None):
    """LLaDA2's forward written out from its published modeling code's facts: the fused
    QKV split by heads, RMSNorm over head_dim on q and k before partial rotate-half RoPE,
    repeated key/value heads, eager attention under an additive ``bias`` [B, 1, L, L],
    a dense SwiGLU first layer, DeepSeek-V3's MoE for the rest."""
    a = model.args
    batch, length = input_ids.shape
    heads, kv, dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
    rot = int(dim * a.partial_rotary_factor)

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.rms_norm_eps))

    inv = 1.0 / (a.rope_theta ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.arange(length).float()[:, None] * inv[None]
    cos = torch.cat([angles, angles], -1).cos()[:, None]  # [L, 1, rot]: q is [B, L, H, D]
    sin = torch.cat([angles, angles], -1).sin()[:, None]

    def rope(x):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        half = torch.cat([-x_rot[..., rot // 2:], x_rot[..., : rot // 2]], -1)
        return torch.cat([x_rot * cos + half * sin, x_pass], -1)

    inner = model.model
    x = inner.word_embeddings.weight[input_ids]
    for index, layer in enumerate(inner.layers):
        h = rms(x, layer.input_layernorm.weight)
        qkv = (h @ layer.attention.query_key_value.weight.T).view(batch, length, heads + 2 * kv, dim)
        q, k, v = qkv[:, :, :heads], qkv[:, :, heads : heads + kv], qkv[:, :, heads + kv :]
        q = rope(rms(q, layer.attention.query_layernorm.weight)).transpose(1, 2)
        k = rope(rms(k, layer.attention.key_layernorm.weight)).transpose(1, 2)
        v = v.transpose(1, 2)
        k, v = (t.repeat_interleave(heads // kv, dim=1) for t in (k, v))
        scores = q @ k.transpose(-1, -2) / dim**0.5
        if bias is not None:
            scores = scores + bias
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, heads * dim)
        x = x + out @ layer.attention.dense.weight.T
        h = rms(x, layer.post_attention_layernorm.weight)
        if index < a.first_k_dense_replace:
            mlp = layer.mlp
            x = x + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        else:
            x = x + deepseek_v3_moe(layer.mlp, a)(h)
    return rms(x, inner.norm.weight) @ model.lm_head.weight.T


def block_causal_bias(length: int, block: int) -> torch.Tensor:
    """LLaDA2's generation mask: 0 where key block <= query block, -inf elsewhere."""
    blocks = torch.arange(length) // block
    keep = blocks[None, :] <= blocks[:, None]
    return torch.zeros(length, length).masked_fill(~keep, float("-inf"))[None, None]


class PositionBiased(torch.nn.Module):
    """A tiny model plus a fixed logit bias per (query position, token), never the mask
    token: canvas and cached calls add the same bias to the same position's row, so the
    confidences spread and near-ties stay away from exact-token comparisons. ``scale``
    None: a random spread of 0.5 to 1.25 per position; a number: that scale everywhere
    (4 makes confidences run from near 0 to near 1, so thresholds and edits are hit)."""

    def __init__(self, model, mask_id, seed, rows=256, scale=None):
        super().__init__()
        self.inner = model
        self.shift_logits = model.shift_logits
        self.cache_kinds = getattr(model, "cache_kinds", ("key", "value"))
        generator = torch.Generator().manual_seed(seed)
        vocab = getattr(model.args, "embedding_size", None) or model.args.vocab_size
        spread = (0.5 + 0.75 * torch.rand(rows, 1, generator=generator) if scale is None
                  else scale)
        self.bias = spread * torch.randn((rows, vocab), generator=generator)
        self.bias[:, mask_id] = -100.0

    def forward(self, input_ids, attention_mask=None, positions=None, visible=None, cache=None):
        logits = self.inner(input_ids, attention_mask, positions, visible, cache)
        if positions is None:
            positions = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
        return logits + self.bias[positions]
