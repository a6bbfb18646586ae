"""How many routed experts a forward really hits, counted on the model's own router.

The roofline assumes uniform routing (``roofline.expected_experts_hit``); a trained router
is skewed, so the report also shows the distinct experts each MoE layer chose per forward,
counted with forward hooks on the routers (PyTorch only, untimed).
"""

from __future__ import annotations

import numpy as np


class ExpertCounter:
    """Hooks every MoE router of a loaded model; ``per_layer()`` averages over forwards."""

    def __init__(self, model):
        self.blocks = getattr(model, "moe_blocks", lambda: [])()
        self.counts = [[] for _ in self.blocks]
        self.hooks = []
        for index, block in enumerate(self.blocks):

            def hook(expert_ids, index=index):  # the block's own routing, not recomputed
                self.counts[index].append(int(expert_ids.unique().numel()))

            block.routing_hooks.append(hook)
            self.hooks.append((block, hook))

    def per_layer(self) -> list[float]:
        return [float(np.mean(c)) if c else 0.0 for c in self.counts]

    def close(self):
        for block, hook in self.hooks:
            block.routing_hooks.remove(hook)


def count_experts(
    generator, family: str, prompt_ids: list[int], config, new_tokens: int
) -> dict:
    """Distinct experts per layer per forward: one diffusion generation over the canvas,
    and autoregressive decoding of ``new_tokens`` tokens (prefill excluded)."""
    from dllm_export import families
    from dllm_export.runtime.autoregressive import greedy_decode
    from dllm_export.runtime.generate import denoise

    model = generator.backend.model
    counter = ExpertCounter(model)
    if not counter.blocks:
        counter.close()
        return {}
    try:
        denoise(
            generator.backend, [prompt_ids], config, generator.special, truncate=True,
            family=families.family(family),
        )
        diffusion = counter.per_layer()
        counter.counts = [[] for _ in counter.blocks]
        greedy_decode(generator.backend, prompt_ids, new_tokens, generator.special.pad_id,
                      families.family(family).positions)
        counter.counts = [
            c[1:] for c in counter.counts
        ]  # the first forward is the prefill
        autoregressive = counter.per_layer()
    finally:
        counter.close()
    return {
        "experts": len(counter.blocks[0].experts),
        "top_k": counter.blocks[0].top_k,
        "diffusion_hit_per_layer": diffusion,
        "autoregressive_hit_per_layer": autoregressive,
    }
