"""LLaDA2's block decoding (``algorithm="llada2"``), with LLaDA2.1's token editing.

Blocks of ``block_length`` are aligned to absolute positions from the first real token, so
the first generation block may begin inside the prompt's last block (its prompt tokens are
committed and never change). Per block, as inclusionAI's ``generate``:

* LLaDA2.0: up to ``steps`` forwards (``steps`` capped at ``gen_length // minimal_topk``);
  step ``s`` commits every masked position whose confidence exceeds ``threshold`` if at
  least ``schedule[s]`` do (the block length spread evenly over the steps), else the
  ``schedule[s]`` most confident; the block ends when it has no mask. After a block holding
  EOS the row is finished; ``eos_early_stop`` ends it as soon as an EOS is committed with no
  mask before it.
* LLaDA2.1 (``editing_threshold`` set): each forward also re-edits committed, non-prompt
  tokens of the block whose new prediction differs with probability above
  ``editing_threshold``; at least ``num_to_transfer`` masks are committed per step; after the
  masks are gone up to ``max_post_steps`` forwards keep editing; the block ends when a step
  changes nothing. Only ``eos_early_stop`` ends a row between blocks.

The confidence is the chosen token's probability: the argmax of the softmax at temperature
0 (as the upstream code does since it stopped sampling at temperature 0), else a sample
from the tempered, top-k / top-p truncated distribution over the decode head's candidates.
"""

from __future__ import annotations

import time

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.runtime import sampling


def schedule(block_length: int, steps: int) -> list[int]:
    """Tokens per step: the block length spread evenly, the remainder on the first steps."""
    return [block_length // steps + (1 if s < block_length % steps else 0) for s in range(steps)]


def common_origin(attention: np.ndarray) -> int:
    """The canvas index of the first real token, the same in every row (LLaDA2 aligns
    blocks to it, so a batch must share one prompt length)."""
    pads = (attention == 0).sum(axis=1)
    if (pads != pads[0]).any():
        raise DllmExportError(
            "algorithm llada2 aligns blocks to the prompt's first token: prompts in one "
            "batch must have the same length (generate them one at a time)")
    return int(pads[0])


def _top(confidence: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return sampling.select_top(confidence, counts)


def _commit_masks(confidence, masked, threshold, counts):
    """Per row: every masked position above ``threshold`` when at least ``counts`` are,
    else the ``counts`` most confident (never more than are masked)."""
    confidence = np.where(masked, confidence, sampling.NEG_INF)
    above = (confidence > threshold) if threshold is not None else np.zeros_like(masked)
    counts = np.minimum(counts, masked.sum(axis=1))
    enough = above.sum(axis=1) >= counts
    return np.where(enough[:, None], above & masked, _top(confidence, counts))


def _finish(canvas, done, start, end, prompt_length, special, early: bool, rows=None):
    """Rows whose answer holds an EOS: finished, later masks filled with EOS. ``early``
    (eos_early_stop): only when nothing before the EOS is masked; ``rows`` limits the check
    to rows that just committed an EOS."""
    generated = canvas[:, prompt_length:]
    candidates = ~done if rows is None else ~done & rows
    for row in np.flatnonzero(candidates):
        eos = np.flatnonzero(generated[row, : end - prompt_length] == special.eos_id)
        if not eos.size:
            continue
        if early and (generated[row, : eos[0]] == special.mask_id).any():
            continue
        tail = generated[row, eos[0]:]
        tail[tail == special.mask_id] = special.eos_id
        done[row] = True
    return done


def llada2_loop(mode, canvas, layout, config, special, rng, on_step, result) -> None:
    """Fill ``canvas`` block by block through ``mode`` (a cache mode of ``cache.py``)."""
    from dllm_export.runtime.generate import StepInfo

    block, prompt_length = config.block_length, layout.prompt_length
    steps = max(1, min(config.steps, config.gen_length // config.minimal_topk))
    counts = schedule(block, steps)
    editing = config.editing_threshold is not None
    done = np.zeros(canvas.shape[0], dtype=bool)
    prompt = np.zeros(canvas.shape, dtype=bool)
    prompt[:, :prompt_length] = True
    mode.start(canvas)
    starts = range(layout.first_block, canvas.shape[1], block)
    for block_index, start in enumerate(starts):
        end = min(start + block, canvas.shape[1])
        region, fixed = canvas[:, start:end], prompt[:, start:end]
        post = np.zeros(canvas.shape[0], dtype=int)
        settled = done.copy()  # rows finished with this block (2.1: nothing left to change)
        step = 0
        while True:
            masked = (region == special.mask_id) & ~settled[:, None]
            if editing:
                post += ~masked.any(axis=1) & ~settled
                settled |= post > config.max_post_steps
                masked &= ~settled[:, None]
                if settled.all():
                    break
            elif step >= steps or not masked.any():
                break
            started = time.perf_counter()
            pred = mode.predict(canvas, start, end, step)
            confidence, x0 = sampling.dream_candidates(
                pred, "maskgit_plus", config.temperature, config.top_p, config.top_k, rng)
            wanted = config.num_to_transfer if editing else counts[min(step, steps - 1)]
            chosen = _commit_masks(confidence, masked, config.threshold,
                                   np.full(canvas.shape[0], wanted))
            if editing:
                edits = (~fixed & (region != special.mask_id) & (x0 != region)
                         & (confidence > config.editing_threshold) & ~settled[:, None])
                settled |= ~masked.any(axis=1) & ~edits.any(axis=1)  # nothing to change
                chosen |= edits
            region[chosen] = x0[chosen]
            step += 1
            result.step_seconds.append(time.perf_counter() - started)
            if on_step:
                committed = np.zeros(canvas.shape, dtype=bool)
                committed[:, start:end] = chosen
                on_step(StepInfo(len(result.step_seconds), block_index, canvas, committed,
                                 mode.forwards.seconds[-1]))
            if config.eos_early_stop and not editing:
                eos_now = ((x0 == special.eos_id) & chosen).any(axis=1)
                done = _finish(canvas, done, start, end, prompt_length, special, True, eos_now)
                settled |= done
        if not editing or config.eos_early_stop:
            done = _finish(canvas, done, start, end, prompt_length, special, early=editing)
        last = end >= canvas.shape[1] or done.all()
        mode.finish_block(canvas, start, end, last)
        if last:
            return
