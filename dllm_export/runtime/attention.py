"""Who attends to whom: the attention rules as boolean masks, built in numpy.

Every cached graph takes its rule as data, an ``attention_mask`` ``[B, Lq, K]`` (True: the
query may attend to the key), so one graph serves every rule. Queries and keys are named
by their canvas index (the cache's slot ``j`` holds canvas position ``j``); ``-1`` marks a
padding row of a window, or a cache slot that holds nothing usable.

Rules, for a real query ``q`` and a real key ``k``:

* ``bidirectional``: every key (LLaDA, LLaDA-MoE, Dream as trained);
* ``causal``: ``k <= q`` (autoregressive decoding of the same backbone);
* ``block_causal``: ``block(k) <= block(q)``: a token sees its own block and every earlier
  one (block diffusion: LLaDA2, SDAR, Fast-dLLM v2). The prompt is block 0.

Left padding is never visible. Every query sees itself, so no row is empty (padding rows
would otherwise give NaN that later layers spread).
"""

from __future__ import annotations

import numpy as np

from dllm_export.errors import DllmExportError

RULES = ("bidirectional", "causal", "block_causal")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise DllmExportError(f"attention rule {rule!r}: choose one of {', '.join(RULES)}")
    return rule


def block_ids(length: int, prompt_length: int, block_length: int,
              origin: int | None = None) -> np.ndarray:
    """Block index of each canvas position. By default the prompt (with its left padding)
    is block 0, then generation blocks of ``block_length`` from ``prompt_length`` on. With
    ``origin`` (the first real token's canvas index) blocks are aligned to absolute
    positions from there, as LLaDA2 numbers them: the prompt spans several blocks and the
    first generation block may start inside the last of them (left pads join block 0)."""
    index = np.arange(length)
    if origin is not None:
        return np.maximum(index - origin, 0) // block_length
    return np.where(index < prompt_length, 0, 1 + (index - prompt_length) // block_length)


def visibility(rule: str, queries: np.ndarray, keys: np.ndarray, real: np.ndarray,
               blocks: np.ndarray | None = None, own: np.ndarray | None = None) -> np.ndarray:
    """The mask ``[B, Lq, K]`` for ``queries`` ``[B, Lq]`` over ``keys`` ``[B, K]``.

    Args:
        rule: one of ``RULES``.
        queries, keys: canvas indices, ``-1`` for a padding row / an empty key.
        real: ``[B, L]`` bool, False on left padding.
        blocks: ``[L]`` block index per canvas position (``block_causal`` only).
        own: ``[Lq]`` index into ``keys`` of each query's own key (default: where the key
            index equals the query index), always visible.
    """
    valid_key = keys >= 0
    safe_keys = np.where(valid_key, keys, 0)
    safe_queries = np.where(queries >= 0, queries, 0)
    key_real = np.take_along_axis(real, safe_keys, axis=1) & valid_key
    visible = np.repeat(key_real[:, None, :], queries.shape[1], axis=1)
    if rule == "causal":
        visible &= safe_keys[:, None, :] <= safe_queries[:, :, None]
    elif rule == "block_causal":
        if blocks is None:
            raise ValueError("block_causal needs block ids")
        visible &= blocks[safe_keys][:, None, :] <= blocks[safe_queries][:, :, None]
    elif rule != "bidirectional":
        check_rule(rule)
    visible &= (queries >= 0)[:, :, None]  # padding rows see only themselves
    if own is None:
        visible |= (queries[:, :, None] == keys[:, None, :]) & (queries >= 0)[:, :, None]
    else:
        visible[:, np.arange(queries.shape[1]), own] = True
    return visible


def window_keys(cache_valid: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Key indices ``[B, C + Lq]`` of a cached call: the valid cache slots, except those
    the call recomputes (its own rows win), then the call's own rows."""
    capacity = cache_valid.shape[1]
    slots = np.where(cache_valid, np.arange(capacity)[None, :], -1)
    batch = queries.shape[0]
    for row in range(batch):  # a window is contiguous: supersede its slots
        fed = queries[row][queries[row] >= 0]
        slots[row, fed[fed < capacity]] = -1
    return np.concatenate([slots, queries], axis=1)


def cached_mask(rule: str, queries: np.ndarray, cache_valid: np.ndarray, real: np.ndarray,
                blocks: np.ndarray | None = None) -> np.ndarray:
    """``attention_mask`` ``[B, Lq, C + Lq]`` of a cached call over ``queries``."""
    keys = window_keys(cache_valid, queries)
    own = cache_valid.shape[1] + np.arange(queries.shape[1])
    return visibility(rule, queries, keys, real, blocks, own=own)


def draft_verify_mask(pending: np.ndarray, masks: np.ndarray, rows: int,
                      cache_valid: np.ndarray, real: np.ndarray,
                      mask_row: int | None = None) -> np.ndarray:
    """``attention_mask`` ``[1, rows, C + rows]`` of a draft-and-verify call (``tidar.py``).

    Rows ``0..len(pending)-1`` hold the pending positions and attend causally (the valid
    cache, then each other); rows ``mask_row..`` (default: right after them) hold the mask
    block, which attends to the valid cache, every pending row and itself; any other row
    is padding and sees only itself.
    """
    capacity = cache_valid.shape[1]
    count, drafted = len(pending), len(masks)
    start = count if mask_row is None else mask_row
    slots = cache_valid[0] & real[0]
    mask = np.zeros((1, rows, capacity + rows), dtype=bool)
    mask[0, :count, :capacity] = slots
    mask[0, :count, capacity:capacity + count] = np.tril(np.ones((count, count), dtype=bool))
    mask[0, start:start + drafted, :capacity] = slots
    mask[0, start:start + drafted, capacity:capacity + count] = True
    mask[0, start:start + drafted, capacity + start:capacity + start + drafted] = True
    every = np.arange(rows)
    mask[0, every, capacity + every] = True
    return mask


def canvas_mask(rule: str, real: np.ndarray, blocks: np.ndarray | None = None) -> np.ndarray:
    """``attention_mask`` ``[B, L, L]`` of a full-canvas call (the prefill graph)."""
    batch, length = real.shape
    index = np.repeat(np.arange(length)[None, :], batch, axis=0)
    return visibility(rule, index, index, real, blocks)


def rope_positions(real: np.ndarray, rule: str) -> np.ndarray:
    """RoPE positions ``[B, L]`` of every canvas index under a family's position rule
    (``families.POSITION_RULES``): the canvas index, or real tokens counted from 0 after
    the left padding with pads at 1 (Dream)."""
    batch, length = real.shape
    if rule == "absolute":
        return np.repeat(np.arange(length, dtype=np.int64)[None, :], batch, axis=0)
    if rule == "real_count":
        counted = np.cumsum(real, axis=1, dtype=np.int64) - 1
        return np.where(real, counted, 1).astype(np.int64)
    raise DllmExportError(f"position rule {rule!r} is not one of absolute, real_count")
