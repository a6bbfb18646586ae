"""The sizes the roofline and the planner need, read from a config.json without torch.

``ModelShape`` is the family-neutral view: layers, widths, experts, vocabulary. Reading it
from a config mirrors each family's ``ModelArgs`` defaults (tests check the parameter totals
against ``parameter_counts``); it lives here, torch-free, so that ``plan`` and ``build`` run on
a Jetson that has only the runtime installed. A family hook (``model_shape(args)``) in
models/ would replace the readers below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dllm_export.checkpoint import detect_family
from dllm_export.errors import DllmExportError


@dataclass(frozen=True)
class ModelShape:
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # rows of the embedding and of the LM head
    tied_embeddings: bool
    dense_layers: int  # layers with a dense SwiGLU MLP
    dense_intermediate: int
    moe_layers: int  # layers with routed experts
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # a shared expert every token passes through (0: none)
    attention_extra: int = 0  # per-layer biases and q/k norm weights

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    # Parameters split by how quantisation treats them: "matrices" are quantised, the rest
    # (embedding, LM head, routers, norms, biases) stays in 16-bit.
    def attention_matrices(self) -> int:
        return self.hidden * (2 * self.q_width + 2 * self.kv_width)

    def expert_matrices(self) -> int:
        """One routed expert's gate, up and down projections."""
        return 3 * self.hidden * self.expert_intermediate

    def matrix_parameters(self) -> int:
        per_layer_attention = self.layers * self.attention_matrices()
        dense = self.dense_layers * 3 * self.hidden * self.dense_intermediate
        shared = self.moe_layers * 3 * self.hidden * self.shared_intermediate
        experts = self.moe_layers * self.experts * self.expert_matrices()
        return per_layer_attention + dense + shared + experts

    def kept_parameters(self) -> int:
        embedding_and_head = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        routers = self.moe_layers * self.hidden * self.experts
        norms = self.layers * (2 * self.hidden + self.attention_extra) + self.hidden
        return embedding_and_head + routers + norms

    def total_parameters(self) -> int:
        return self.matrix_parameters() + self.kept_parameters()


def _required(config: dict, names: tuple[str, ...], family: str, path) -> None:
    for name in names:
        if config.get(name) in (None, -1):
            raise DllmExportError(f"{path}: field '{name}' is missing (needed for {family})")


def _llada(config: dict, path) -> ModelShape:
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


def _llada_moe(config: dict, path) -> ModelShape:
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


def _dream(config: dict, path) -> ModelShape:
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


READERS = {"llada": _llada, "llada-moe": _llada_moe, "dream": _dream}


def model_shape(config: dict, family: str | None = None,
                config_path: Path | str = "config.json") -> ModelShape:
    """The family-neutral sizes of a model from its config.json contents.

    Args:
        config: the checkpoint's config.json as a dict.
        family: "llada", "llada-moe" or "dream"; detected from the config when None.
        config_path: named in error messages.
    """
    family = family or detect_family(config, Path(config_path))
    if family not in READERS:
        raise DllmExportError(
            f"{config_path}: family {family!r} is not supported (supported: "
            f"{', '.join(READERS)})"
        )
    return READERS[family](config, config_path)
