"""Calibration states for the cached graphs: the inputs each one meets in cached decoding.

The float artifact decodes the calibration prompts in every cache mode its family decodes
with (``prefix``: prefill and window; ``dual``: prefill and step; ``block``: prefill, step
and the commits; ``none`` where it runs a cached graph: the prefill graph of a
block-causal family, the rows graph of a bidirectional one), with the family's block
sampler (LLaDA2's own, else LLaDA's), and autoregressively (decode), and the backend's
``on_feeds`` hook records every cached call's inputs, the cache it attended to included. Short prompts prefill in
chunks of the cached graphs; when none reached the full-canvas prefill graph, each prompt is
decoded once more after the ones before it (a conversation long enough for it). Each graph keeps up to
``samples`` of its states, spread evenly over what was recorded, so a quantised step graph
is calibrated on steps and not on canvases.
"""

from __future__ import annotations

import numpy as np

from dllm_export import families
from dllm_export.runtime.autoregressive import greedy_decode
from dllm_export.runtime.generate import denoise

DECODE_TOKENS = 8


def _thin(states: list, samples: int) -> list:
    if len(states) <= samples:
        return states
    keep = np.linspace(0, len(states) - 1, samples).round().astype(int)
    return [states[i] for i in sorted(set(keep))]


def _context(prompts: list[list[int]], index: int, room: int) -> list[int]:
    """The prompt at ``index`` after the ones before it (a conversation), its last
    ``room`` tokens: autoregressive decoding prefills with the full-canvas prefill graph
    only a prompt over half the canvas, which short prompts (the built-in tasks) never are
    alone."""
    tokens = list(prompts[index])
    for earlier in reversed(prompts[:index]):
        if len(tokens) >= room:
            break
        tokens = earlier + tokens
    return tokens[-room:]


def cached_graph_states(backend, generator, prompts: list[list[int]], samples: int,
                        progress=None) -> dict[str, list[dict]]:
    """Per cached graph, up to ``samples`` input feeds recorded from cached decoding.

    Args:
        backend: the float artifact's ``OrtBackend`` (with cached graphs).
        generator: a ``Generator`` over it (special tokens, defaults, family).
        prompts: tokenised calibration prompts.
        samples: states to keep per graph.
    """
    progress = progress or (lambda stage, detail="": None)
    cache = backend.manifest["cache"]
    block = cache["block_length"]
    family = families.family(generator.family)
    gen = max(block, min(generator.defaults.gen_length, cache["window"]) // block * block)
    algorithm = generator.defaults.algorithm
    if algorithm not in ("llada2", "tidar"):  # LLaDA's block schedule for the others
        algorithm = "llada"
    config = generator.defaults.updated(algorithm=algorithm, gen_length=gen, steps=gen,
                                        block_length=block, early_exit=False)
    # "none" reaches the cached graphs under a block-causal rule, and the rows graph;
    # draft-and-verify decodes one way (its draft graph over the exact cache)
    modes = [mode for mode in cache["modes"]
             if mode != "none" or cache["attention"] != "bidirectional" or "rows" in backend.graphs]
    if algorithm == "tidar":
        modes = [None]
    recorded: dict[str, list[dict]] = {name: [] for name in backend.graphs}
    backend.on_feeds = lambda name, feeds: recorded[name].append(feeds)
    room = backend.seq_len - gen
    try:
        for index, prompt in enumerate(prompts):
            if all(len(states) >= 2 * samples for states in recorded.values()):
                break
            progress("calibration", f"cached graphs: prompt {index + 1}/{len(prompts)}")
            for mode in modes:
                denoise(backend, [prompt[-room:]], config.updated(cache=mode),
                        generator.special, family=family)
            tail = prompt[-(backend.seq_len - DECODE_TOKENS):]
            greedy_decode(backend, tail, DECODE_TOKENS, generator.special.pad_id,
                          family.positions)
        if "prefill" in recorded and not recorded["prefill"]:  # every prompt was short
            for index in range(len(prompts)):
                greedy_decode(backend, _context(prompts, index, backend.seq_len - DECODE_TOKENS),
                              DECODE_TOKENS, generator.special.pad_id, family.positions)
    finally:
        backend.on_feeds = None
    return {name: _thin(states, samples) for name, states in recorded.items()}
