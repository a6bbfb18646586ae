"""The family registry: the one place a family is named outside its model file.

Torch-free, so that the runtime, ``plan`` and ``build`` can use it on a device that has
only the runtime installed. An entry says how to recognise a family's config, where its
model code lives, how its config maps to the family-neutral ``ModelShape``, its sampler
defaults, and how the runtime must drive it: RoPE positions under left padding, whether
row p of its output predicts p or p + 1, the attention rule it was trained with, and the
cache modes it supports. Adding a family is one model file plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dllm_export.errors import DllmExportError
from dllm_export.model_shape import ModelShape

# runtime/cache.py implements these; "block" is exact only under the block-causal rule.
CACHE_MODES = ("none", "prefix", "dual", "block")
ATTENTION_RULES = ("bidirectional", "block_causal", "causal")
POSITION_RULES = ("absolute", "real_count")


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # dllm_export/models/<module>.py
    matches: Callable[[dict], bool]  # is this config.json one of ours? (entries tried in order)
    shape: Callable[[dict, object], ModelShape]
    sampler: dict  # SamplerConfig defaults, overridden by generation_config.json
    # "absolute": RoPE position = canvas index (pads keep theirs); "real_count": real tokens
    # are numbered from 0 after the left padding and pads get 1 (Dream).
    positions: str = "absolute"
    shift_logits: bool = False  # row p of the output predicts position p + 1 (Dream)
    attention: str = "bidirectional"
    cache_modes: tuple = CACHE_MODES
    # the cached graphs an export makes (contract.py); draft-and-verify families: DRAFT_GRAPHS
    cached_graphs: tuple = ("prefill", "step", "window", "decode")
    # draft-and-verify: a mask row predicts its own position (TiDAR) or the next (Dream)
    draft_shift: bool = False
    # the config keys the readers use: key -> (type, least value for ints), checked before
    # anything reads the config (``"d_model": "64"`` or ``"n_heads": 0`` is one line)
    schema: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    @property
    def default_cache(self) -> str:
        """Exact by default: the block cache where the model is block-causal (or causal)."""
        return "none" if self.attention == "bidirectional" else "block"


def _required(config: dict, names: tuple[str, ...], family: str, path) -> None:
    for name in names:
        if config.get(name) in (None, -1):
            raise DllmExportError(f"{path}: field '{name}' is missing (needed for {family})")


def _llada_shape(config: dict, path) -> ModelShape:
    _required(config, ("d_model", "n_heads", "n_layers", "vocab_size"), "LLaDA", path)
    heads = config["n_heads"]
    kv_heads = 1 if config.get("multi_query_attention") else (config.get("n_kv_heads") or heads)
    hidden = config["d_model"]
    return ModelShape(
        family="llada",
        layers=config["n_layers"],
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=hidden // heads,
        vocab=config.get("embedding_size") or config["vocab_size"],
        tied_embeddings=bool(config.get("weight_tying", False)),
        dense_layers=config["n_layers"],
        dense_intermediate=config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * hidden,
        moe_layers=0,
    )


def _llada_moe_shape(config: dict, path) -> ModelShape:
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_experts", "num_experts_per_tok", "expert_intermediate_size")
    _required(config, names, "LLaDA-MoE", path)
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    heads = config["num_attention_heads"]
    moe_flags = config.get("moe_layer_freq") or [1] * layers
    moe_layers = sum(1 for flag in moe_flags if flag)
    head_dim = hidden // heads
    shared = config.get("shared_expert_intermediate_size") or 0
    return ModelShape(
        family="llada-moe",
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        dense_layers=layers - moe_layers,
        dense_intermediate=config.get("dense_intermediate_size") or 0,
        moe_layers=moe_layers,
        experts=config["num_experts"],
        experts_per_token=config["num_experts_per_tok"],
        expert_intermediate=config["expert_intermediate_size"],
        shared_intermediate=max(shared, 0),
        attention_extra=2 * head_dim if config.get("qk_layernorm", True) else 0,
    )


def _dream_shape(config: dict, path) -> ModelShape:
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
    _required(config, names, "Dream", path)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = hidden // heads
    return ModelShape(
        family="dream",
        layers=config["num_hidden_layers"],
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        dense_layers=config["num_hidden_layers"],
        dense_intermediate=config["intermediate_size"],
        moe_layers=0,
        attention_extra=heads * head_dim + 2 * kv_heads * head_dim,  # q, k, v biases
    )


def _llada2_shape(config: dict, path) -> ModelShape:
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok")
    _required(config, names, "LLaDA2", path)
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    dense = min(config.get("first_k_dense_replace") or 0, layers)
    inner = config["moe_intermediate_size"]
    return ModelShape(
        family="llada2",
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        dense_layers=dense,
        dense_intermediate=config["intermediate_size"],
        moe_layers=layers - dense,
        experts=config["num_experts"],
        experts_per_token=config["num_experts_per_tok"],
        expert_intermediate=inner,
        shared_intermediate=inner * (config.get("num_shared_experts") or 0),
        attention_extra=2 * head_dim if config.get("use_qk_norm", True) else 0,
    )


def _zaya_shape(config: dict, path) -> ModelShape:
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts")
    _required(config, names, "ZAYA1", path)
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    heads, kv_heads, head_dim = (config["num_attention_heads"], config["num_key_value_heads"],
                                 config["head_dim"])
    experts, width = config["num_experts"], config.get("router_hidden_size") or 256
    channels = (heads + kv_heads) * head_dim
    taps0, taps1 = config.get("cca_time0") or 2, config.get("cca_time1") or 2
    conv = channels * taps0 + channels * head_dim * taps1 + 2 * channels + kv_heads
    # the router beyond the hidden x experts that ModelShape counts: its down-projection,
    # MLP, balancing biases and state scale; the residual scales (8 vectors per layer)
    router = (hidden * width + width + 2 * (width * width + width) + width
              + width * (experts + 1) + (experts + 1) - hidden * experts)
    return ModelShape(
        family="zaya1",
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        dense_layers=0,
        dense_intermediate=0,
        moe_layers=layers,
        experts=experts,
        experts_per_token=1,
        expert_intermediate=config["moe_intermediate_size"],
        attention_extra=conv + router + 8 * hidden,
        extra_cache=(("conv", 1, channels), ("delayed", 1, kv_heads * head_dim // 2)),
        # the input scale and bias; the router state scale of every layer but the first
        extra_parameters=2 * hidden + (layers - 1) * width,
    )


def _diffusion_gemma_shape(config: dict, path) -> ModelShape:
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise DllmExportError(f"{path}: field 'text_config' is missing (needed for "
                              "DiffusionGemma)")
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
             "top_k_experts", "moe_intermediate_size")
    for name in names:
        value = text.get(name)
        if value is None:
            raise DllmExportError(f"{path}: field 'text_config.{name}' is missing (needed for "
                                  "DiffusionGemma)")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DllmExportError(f"{path}: field 'text_config.{name}' = {value!r} must be "
                                  "an integer of at least 1")
    layers, hidden, heads = (text["num_hidden_layers"], text["hidden_size"],
                             text["num_attention_heads"])
    kinds = text.get("layer_types") or [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) != layers:
        raise DllmExportError(f"{path}: field 'text_config.layer_types' must list one type "
                              f"per layer ({layers})")
    overrides = text.get("per_layer_config") or {}
    shared_kv = text.get("attention_k_eq_v", True)
    # per layer (head_dim, key/value heads, projections k and v or k alone)
    per_layer = []
    for index, kind in enumerate(kinds):
        own = overrides.get(str(index)) or overrides.get(f"{index:02d}") or {}
        if kind == "full_attention" and not overrides:
            own = {"head_dim": 512}
        head_dim = own.get("head_dim", text["head_dim"])
        kv_heads = own.get("num_key_value_heads", text["num_key_value_heads"])
        per_layer.append((head_dim, kv_heads, 1 if shared_kv and kind == "full_attention" else 2))
    head_dim = max(d for d, _, _ in per_layer)
    kv_width = max(d * kv for d, kv, _ in per_layer)
    experts, inner = text["num_experts"], text["intermediate_size"]
    return ModelShape(
        family="diffusion-gemma",
        layers=layers,
        hidden=hidden,
        # the largest layer's widths (activations, attention FLOPs and the cache per token
        # are bounded by them); the projections are counted exactly in attention_total
        heads=heads,
        kv_heads=-(-kv_width // head_dim),
        head_dim=head_dim,
        vocab=text["vocab_size"],
        tied_embeddings=True,
        dense_layers=0,
        dense_intermediate=0,
        moe_layers=layers,
        experts=experts,
        experts_per_token=text["top_k_experts"],
        expert_intermediate=text["moe_intermediate_size"],
        shared_intermediate=inner,  # the dense MLP every token passes besides the experts
        # 7 norms, the router's input scale and per-expert scale (the router matrix is
        # ModelShape's hidden x experts)
        attention_extra=6 * hidden + experts,
        # q/k norms (their widths differ per layer type); the decoder's self-conditioning
        # MLP and its norm
        extra_parameters=sum(2 * d for d, _, _ in per_layer) + hidden + 3 * hidden * inner,
        attention_total=sum(hidden * (2 * heads * d + n * kv * d) for d, kv, n in per_layer),
    )


LLADA2_TYPES = ("llada2_moe", "llada2_moe_veomni", "llada21_moe", "llada21_moe_veomni")


def _is_llada_moe(config: dict) -> bool:
    return config.get("model_type") == "llada" and (
        "num_experts" in config or "expert_intermediate_size" in config)


REGISTRY: dict[str, Family] = {
    family.name: family
    for family in (
        # LLaDA-MoE also says model_type 'llada': its MoE keys tell it apart, so it goes first.
        Family("llada-moe", "llada_moe", _is_llada_moe, _llada_moe_shape,
               dict(algorithm="llada", gen_length=128, steps=128, block_length=32),
               schema={**dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads",
                                        "num_experts", "num_experts_per_tok",
                                        "expert_intermediate_size"), (int, 1)),
                       "dense_intermediate_size": (int, 0),
                       "shared_expert_intermediate_size": (int, -1),
                       "moe_layer_freq": (list,), "qk_layernorm": (bool,),
                       "tie_word_embeddings": (bool,)}),
        Family("llada", "llada",
               lambda c: c.get("model_type") == "llada" and "d_model" in c, _llada_shape,
               dict(algorithm="llada", gen_length=128, steps=128, block_length=32),
               schema={**dict.fromkeys(("d_model", "n_heads", "n_kv_heads", "n_layers",
                                        "vocab_size", "embedding_size", "mlp_hidden_size",
                                        "mlp_ratio"), (int, 1)),
                       "weight_tying": (bool,), "multi_query_attention": (bool,)}),
        # LLaDA2.0/2.1: published checkpoints say llada2_moe (2.1: llada21_moe), the
        # training repository's configs llada2_moe_veomni.
        Family("llada2", "llada2", lambda c: c.get("model_type") in LLADA2_TYPES,
               _llada2_shape,
               dict(algorithm="llada2", gen_length=256, steps=32, block_length=32,
                    threshold=0.95),
               positions="real_count", attention="block_causal", cache_modes=("none", "block"),
               schema={**dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads",
                                        "head_dim", "intermediate_size",
                                        "moe_intermediate_size", "num_experts",
                                        "num_experts_per_tok", "n_group", "topk_group"),
                                       (int, 1)),
                       "first_k_dense_replace": (int, 0), "num_shared_experts": (int, 0),
                       "tie_word_embeddings": (bool,), "use_qk_norm": (bool,)}),
        # ZAYA1 (transformers' ZayaForCausalLM): autoregressive; decoded draft-and-verify
        # (TiDAR) with its exact causal cache.
        Family("zaya1", "zaya1", lambda c: c.get("model_type") == "zaya", _zaya_shape,
               dict(algorithm="tidar", gen_length=128, steps=128, block_length=16),
               shift_logits=True, attention="causal", cache_modes=("block",),
               cached_graphs=("prefill", "draft", "decode"),
               schema={**dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads",
                                        "head_dim", "moe_intermediate_size", "num_experts",
                                        "num_experts_per_tok", "router_hidden_size",
                                        "cca_time0", "cca_time1"), (int, 1)),
                       "tie_word_embeddings": (bool,)}),
        # DiffusionGemma (transformers' DiffusionGemmaForBlockDiffusion): a causal encoder
        # writes the prompt's cache, a bidirectional decoder denoises a canvas over it, a
        # causal commit pass writes the accepted canvas; its own entropy-bound sampler
        # (not yet in the runtime: sampler holds transformers' generation defaults).
        Family("diffusion-gemma", "diffusion_gemma",
               lambda c: c.get("model_type") == "diffusion_gemma", _diffusion_gemma_shape,
               dict(algorithm="diffusion_gemma", gen_length=256, steps=48, block_length=256),
               attention="causal", cache_modes=("block",), cached_graphs=(),
               notes={"generation": {"max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8,
                                     "entropy_bound": 0.1, "stability_threshold": 1,
                                     "confidence_threshold": 0.005}}),
        Family("dream", "dream",
               lambda c: isinstance(c.get("model_type"), str) and c["model_type"].lower() == "dream",
               _dream_shape, dict(algorithm="dream", gen_length=128, steps=128, alg="entropy"),
               positions="real_count", shift_logits=True, draft_shift=True,
               schema={**dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size",
                                        "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads"), (int, 1)),
                       "tie_word_embeddings": (bool,)}),
    )
}
NAMES = tuple(REGISTRY)


def family(name: str) -> Family:
    """The registry entry for ``name``, or one line listing the known families."""
    if name not in REGISTRY:
        raise DllmExportError(f"unknown family {name!r}; choose one of {', '.join(NAMES)}")
    return REGISTRY[name]


POSITIVE_FLOATS = {"rms_norm_eps": 0.0, "rope_theta": 0.0}  # at least / above


def check_config(entry: Family, config: dict, config_path) -> None:
    """One line for a size that is not an integer or below its least value, and for a
    negative norm epsilon or a non-positive RoPE base."""
    words = {int: "an integer", bool: "true or false", list: "a list"}
    for key, (kind, *least) in entry.schema.items():
        value = config.get(key)
        if value is None:
            continue
        wrong = isinstance(value, bool) and kind is not bool
        if wrong or not isinstance(value, kind):
            raise DllmExportError(
                f"{config_path}: field '{key}' = {value!r} must be {words[kind]}")
        if least and value < least[0]:
            raise DllmExportError(
                f"{config_path}: field '{key}' = {value} must be at least {least[0]}")
        if kind is list and not all(isinstance(v, int) and v in (0, 1) for v in value):
            raise DllmExportError(f"{config_path}: field '{key}' must list 0 or 1 per layer")
    for key, floor in POSITIVE_FLOATS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DllmExportError(f"{config_path}: field '{key}' = {value!r} must be a number")
        if value < floor or (key == "rope_theta" and value <= floor) or value != value:
            raise DllmExportError(f"{config_path}: field '{key}' = {value} is out of range")


def detect_family(config: dict, config_path: Path | str = "config.json") -> str:
    """The family of a config.json, tried in registry order; one line when none matches."""
    for entry in REGISTRY.values():
        if entry.matches(config):
            return entry.name
    model_type = config.get("model_type")
    if model_type is None:
        raise DllmExportError(f"{config_path}: field 'model_type' is missing")
    if model_type == "llada":
        raise DllmExportError(
            f"{config_path}: model_type 'llada' but neither 'd_model' (LLaDA) nor "
            "'num_experts' (LLaDA-MoE) is present")
    raise DllmExportError(
        f"{config_path}: model_type '{model_type}' is not a supported family "
        f"(supported: {', '.join(NAMES)})")
