"""Autoregressive decoding of the same backbone: the causal mode of the cached graphs.

The baseline diffusion decoding is compared with. No second implementation of any model:
the backend's ``prefill`` runs the prompt under the causal rule (and writes the cache),
then each new token is one ``cached_step`` of one query at the next position, attending
to the cache and writing its own keys and values there. The next token is the argmax of
the last row (for a diffusion-trained model that is no meaningful text: only the speed
of this baseline matters, unless the model was also trained causally).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.runtime.attention import cached_mask, canvas_mask, rope_positions


@dataclass
class DecodeTimes:
    """One autoregressive run."""

    prefill_seconds: float
    token_seconds: list  # one per decoded token
    tokens: list  # greedy ids


def greedy_decode(backend, prompt: list[int], new_tokens: int, pad_id: int,
                  positions_rule: str = "absolute") -> DecodeTimes:
    """Prefill ``prompt`` (which yields the first token), then one forward per further
    token, ``new_tokens`` greedy tokens in all.

    Args:
        backend: any backend with cached graphs; its cache capacity (the canvas length of
            fixed-shape artifacts) must hold the prompt and the new tokens.
        prompt: token ids (no padding: one sequence).
        new_tokens: tokens to decode (no early stop, so runs are comparable).
        pad_id: filler for the canvas beyond the prompt (never visible under the rule).
        positions_rule: the family's RoPE position rule (``families.POSITION_RULES``).
    """
    capacity = backend.seq_len or len(prompt) + new_tokens
    if len(prompt) + new_tokens > capacity:
        raise DllmExportError(
            f"autoregressive decoding of {new_tokens} tokens after a {len(prompt)}-token "
            f"prompt needs {len(prompt) + new_tokens} cache slots; the artifact holds "
            f"{capacity} (re-export with a larger --seq-len)")
    rows = backend.rows_for(1)
    backend.reset_cache(1, capacity)
    canvas = np.full((1, capacity), pad_id, dtype=np.int64)
    canvas[0, : len(prompt)] = prompt
    real = np.ones((1, capacity), dtype=bool)
    positions = rope_positions(real, positions_rule)
    valid = np.zeros((1, capacity), dtype=bool)
    started = time.perf_counter()
    pred = backend.prefill(canvas, positions, canvas_mask("causal", real))
    token = int(pred.topk_ids[0, len(prompt) - 1, 0])
    prefill = time.perf_counter() - started
    valid[0, : len(prompt)] = True
    times, out = [], [token]
    # The prefill made the first token; each further one costs one forward.
    for position in range(len(prompt), len(prompt) + new_tokens - 1):
        started = time.perf_counter()
        ids = np.full((1, rows), pad_id, dtype=np.int64)
        ids[0, 0] = token
        queries = np.full((1, rows), -1, dtype=np.int64)
        queries[0, 0] = position
        rope = np.zeros((1, rows), dtype=np.int64)
        rope[0, 0] = positions[0, position]
        mask = cached_mask("causal", queries, valid, real)
        pred = backend.cached_step(ids, rope, mask, write=(0, position, 1))
        valid[0, position] = True
        token = int(pred.topk_ids[0, 0, 0])
        out.append(token)
        times.append(time.perf_counter() - started)
    return DecodeTimes(prefill, times, out)
