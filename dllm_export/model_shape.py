"""The sizes the roofline and the planner need, read from a config.json without torch.

``ModelShape`` is the family-neutral view: layers, widths, experts, vocabulary. Each
family's reader (in ``families.py``) mirrors its ``ModelArgs`` defaults (tests check the
parameter totals against ``parameter_counts``); it is torch-free, so that ``plan`` and
``build`` run on a Jetson that has only the runtime installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    attention_extra: int = 0  # per-layer biases, q/k norm weights, other small tensors
    extra_parameters: int = 0  # small tensors outside the layers (ZAYA1's input scaling)
    # per-layer cache state besides keys and values, (kind, heads, width) each, before
    # them in the layer's order (ZAYA1's CCA: its convolution input and delayed value)
    extra_cache: tuple = ()
    # every layer's attention projections together where layers differ (DiffusionGemma's
    # sliding and full layers; the widths above are then the largest layer's); 0: layers x
    # attention_matrices()
    attention_total: int = 0

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def cache_kinds(self) -> tuple:
        """Every per-layer cache state as (kind, heads, width), in the layer's order."""
        return (*self.extra_cache, ("key", self.kv_heads, self.head_dim),
                ("value", self.kv_heads, self.head_dim))

    @property
    def cache_width(self) -> int:
        """Cached elements per layer per token."""
        return sum(heads * width for _, heads, width in self.cache_kinds())

    # Parameters split by how quantisation treats them: "matrices" are quantised, the rest
    # (embedding, LM head, routers, norms, biases) stays in 16-bit.
    def attention_matrices(self) -> int:
        return self.hidden * (2 * self.q_width + 2 * self.kv_width)

    def expert_matrices(self) -> int:
        """One routed expert's gate, up and down projections."""
        return 3 * self.hidden * self.expert_intermediate

    def all_attention_matrices(self) -> int:
        return self.attention_total or self.layers * self.attention_matrices()

    def matrix_parameters(self) -> int:
        per_layer_attention = self.all_attention_matrices()
        dense = self.dense_layers * 3 * self.hidden * self.dense_intermediate
        shared = self.moe_layers * 3 * self.hidden * self.shared_intermediate
        experts = self.moe_layers * self.experts * self.expert_matrices()
        return per_layer_attention + dense + shared + experts

    def kept_parameters(self) -> int:
        embedding_and_head = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        routers = self.moe_layers * self.hidden * self.experts
        norms = self.layers * (2 * self.hidden + self.attention_extra) + self.hidden
        return embedding_and_head + routers + norms + self.extra_parameters

    def total_parameters(self) -> int:
        return self.matrix_parameters() + self.kept_parameters()

    def active_parameters(self) -> int:
        """Parameters one token passes through: every expert not routed to it left out."""
        idle = self.moe_layers * (self.experts - self.experts_per_token) * self.expert_matrices()
        return self.total_parameters() - idle


def model_shape(config: dict, family: str | None = None,
                config_path: Path | str = "config.json") -> ModelShape:
    """The family-neutral sizes of a model from its config.json contents.

    Args:
        config: the checkpoint's config.json as a dict.
        family: a registry name (``families.NAMES``); detected from the config when None.
        config_path: named in error messages.
    """
    from dllm_export import families

    name = family or families.detect_family(config, config_path)
    entry = families.family(name)
    families.check_config(entry, config, config_path)
    return entry.shape(config, config_path)
