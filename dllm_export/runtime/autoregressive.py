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


def _call(backend, canvas, positions, valid, real, first, last, pad_id):
    """One causal call over canvas positions ``first:last``; writes their keys and values."""
    rows = backend.rows_for(last - first)
    count = last - first
    queries = np.full((1, rows), -1, dtype=np.int64)
    queries[0, :count] = np.arange(first, last)
    ids = np.full((1, rows), pad_id, dtype=np.int64)
    ids[0, :count] = canvas[0, first:last]
    rope = np.zeros((1, rows), dtype=np.int64)
    rope[0, :count] = positions[0, first:last]
    pred = backend.cached_step(ids, rope, cached_mask("causal", queries, valid, real),
                               write=(0, first, count))
    valid[0, first:last] = True
    return pred


def _prefill(backend, canvas, positions, valid, real, length: int, pad_id: int):
    """The prompt's keys and values; returns the last prompt row's (top ids, top
    log-probabilities). In chunks of the largest cached graph (as an autoregressive server
    prefills: the cost grows with the prompt, not the canvas), or with the full-canvas
    prefill graph when the chunks would cover more than half the canvas anyway."""
    chunk = backend.max_rows() or length
    if -(-length // chunk) * chunk > canvas.shape[1] // 2:  # then the canvas is cheaper
        pred = backend.prefill(canvas, positions, canvas_mask("causal", real))
        valid[0, :length] = True
        return pred.topk_ids[0, length - 1], pred.topk_logprobs[0, length - 1]
    for first in range(0, length, chunk):
        last = min(first + chunk, length)
        pred = _call(backend, canvas, positions, valid, real, first, last, pad_id)
    return pred.topk_ids[0, last - first - 1], pred.topk_logprobs[0, last - first - 1]


def _greedy(top_ids, top_logprobs) -> int:
    return int(top_ids[0])


def next_tokens(backend, prompt: list[int], new_tokens: int, pad_id: int, choose=_greedy,
                positions_rule: str = "absolute"):
    """Yields (token, seconds) for ``new_tokens`` tokens after ``prompt``: the first from the
    prefill (its seconds: the prefill's), each further one from one forward of one query at
    the next position, attending to the cache and writing its own keys and values there.
    ``choose(top_ids, top_logprobs)`` picks a token from a row's top-K (default: greedy).

    The backend's cache capacity (the canvas length of fixed-shape artifacts) must hold the
    prompt and the new tokens."""
    capacity = backend.seq_len or len(prompt) + new_tokens
    if len(prompt) + new_tokens > capacity:
        raise DllmExportError(
            f"autoregressive decoding of {new_tokens} tokens after a {len(prompt)}-token "
            f"prompt needs {len(prompt) + new_tokens} cache slots; the artifact holds "
            f"{capacity} (re-export with a larger --seq-len)")
    backend.reset_cache(1, capacity)
    canvas = np.full((1, capacity), pad_id, dtype=np.int64)
    canvas[0, : len(prompt)] = prompt
    real = np.ones((1, capacity), dtype=bool)
    positions = rope_positions(real, positions_rule)
    valid = np.zeros((1, capacity), dtype=bool)
    started = time.perf_counter()
    token = choose(*_prefill(backend, canvas, positions, valid, real, len(prompt), pad_id))
    yield token, time.perf_counter() - started
    for position in range(len(prompt), len(prompt) + new_tokens - 1):
        started = time.perf_counter()
        canvas[0, position] = token
        pred = _call(backend, canvas, positions, valid, real, position, position + 1, pad_id)
        token = choose(pred.topk_ids[0, 0], pred.topk_logprobs[0, 0])
        yield token, time.perf_counter() - started


def greedy_decode(backend, prompt: list[int], new_tokens: int, pad_id: int,
                  positions_rule: str = "absolute") -> DecodeTimes:
    """Prefill ``prompt`` (which yields the first token), then one forward per further
    token, ``new_tokens`` greedy tokens in all (no early stop, so runs are comparable).

    Args:
        backend: any backend with cached graphs.
        prompt: token ids (no padding: one sequence).
        new_tokens: tokens to decode.
        pad_id: filler for the canvas beyond the prompt (never visible under the rule).
        positions_rule: the family's RoPE position rule (``families.POSITION_RULES``).
    """
    steps = list(next_tokens(backend, prompt, new_tokens, pad_id, _greedy, positions_rule))
    return DecodeTimes(steps[0][1], [seconds for _, seconds in steps[1:]],
                       [token for token, _ in steps])
