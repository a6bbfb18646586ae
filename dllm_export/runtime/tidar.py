"""TiDAR-style draft-and-verify decoding (arXiv 2511.08923; ZAYA1-Diffusion's recipe).

One forward per step over ``[exact causal cache | pending tokens, verified causally | a
block of masks, drafted bidirectionally]``, in a cached graph of at least ``2 * block``
rows, under the mask ``attention.draft_verify_mask`` builds:

* the pending region holds the token the last step made certain (``c``) and the drafts for
  the positions after it; its rows attend causally (cache, then each other);
* the mask block sits right after the pending region and attends to the cache, the whole
  pending region and itself (bidirectionally): its rows draft the next block, assuming
  every pending draft is accepted.

The pending region's rows give the autoregressive predictions that verify the drafts: the
longest run that they confirm is accepted, its keys and values go into the cache (they were
computed causally over the exact prefix, so the cache stays exact), and the prediction
after the last accepted token becomes the next certain token. When every draft was accepted
the mask block's drafts are the next pending drafts; otherwise the next step starts from the
certain token alone. Two acceptance rules:

* ``lossless``: the target is the autoregressive distribution; at temperature 0 the output is
  token for token greedy autoregressive decoding; with sampling, the speculative rejection
  rule (accept with min(1, p/q), else sample the residual) makes it exactly autoregressive
  sampling from the top-K (the artifact's ``topk``) at that temperature;
* ``logit-mix``: the target blends log-probabilities, ``(1 - w) log p_ar + w log q_draft``
  over the autoregressive top-K: more drafts pass as ``w`` grows (``w = 0`` is lossless).

Rows of a drafting family predict their own position (TiDAR) unless the family's
``draft_shift`` says the next one (Dream's diffusion convention).
"""

from __future__ import annotations

import time

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.runtime.attention import draft_verify_mask, rope_positions

SAMPLERS = ("lossless", "logit-mix")


def _target(logprobs, ids, temperature: float, mix: float, draft=None):
    """The target distribution over the autoregressive top-K (``ids``): probabilities, or a
    one-hot of the argmax at temperature 0."""
    scores = logprobs.astype(np.float64)
    if mix and draft is not None:
        draft_ids, draft_logprobs = draft
        lookup = dict(zip(draft_ids.tolist(), draft_logprobs.tolist(), strict=False))
        floor = float(draft_logprobs[-1])
        q = np.array([lookup.get(int(t), floor) for t in ids])
        scores = (1 - mix) * scores + mix * q
    if temperature <= 0:
        out = np.zeros_like(scores)
        out[int(np.argmax(scores))] = 1.0
        return out
    scores = scores / temperature
    scores = np.exp(scores - scores.max())
    return scores / scores.sum()


def _draft_distribution(logprobs, temperature: float):
    if temperature <= 0:
        out = np.zeros(len(logprobs))
        out[0] = 1.0
        return out
    scores = logprobs.astype(np.float64) / temperature
    scores = np.exp(scores - scores.max())
    return scores / scores.sum()


def _sample(ids, probs, rng):
    if probs.max() >= 1.0:
        return int(ids[int(np.argmax(probs))])
    return int(rng.choice(ids, p=probs))


def _verify(draft_token: int, draft_q: dict, target_ids, target_p, rng):
    """Speculative acceptance of one draft sampled from ``draft_q``: accept with probability
    min(1, p/q); else the token to commit instead, from the residual max(0, p - q)."""
    p = dict(zip(target_ids.tolist(), target_p.tolist(), strict=False))
    p_d, q_d = p.get(int(draft_token), 0.0), draft_q.get(int(draft_token), 0.0)
    if p_d > 0 and (q_d <= 0 or rng.random() < min(1.0, p_d / q_d)):
        return True, None
    support = sorted(set(p) | set(draft_q))
    residual = np.array([max(0.0, p.get(t, 0.0) - draft_q.get(t, 0.0)) for t in support])
    if residual.sum() <= 0:
        residual = np.array([p.get(t, 0.0) for t in support])
    return False, _sample(np.array(support), residual / residual.sum(), rng)


class TidarStats:
    def __init__(self):
        self.forwards = 0
        self.accepted: list[int] = []  # tokens committed by each forward
        self.forward_seconds: list[float] = []


def tidar_decode(backend, prompt: list[int], gen_length: int, block: int, pad_id: int,
                 eos_ids=(), temperature: float = 0.0, sampler: str = "lossless",
                 mix: float = 0.5, draft_shift: bool = False, mask_id: int = 0,
                 positions_rule: str = "absolute", seed: int = 0, early_exit: bool = True,
                 on_step=None):
    """Decode ``gen_length`` tokens after ``prompt`` (one sequence). Returns (tokens,
    TidarStats)."""
    if sampler not in SAMPLERS:
        raise DllmExportError(f"--tidar-sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if not 0 <= mix <= 1:
        raise DllmExportError(f"--mix {mix}: must be between 0 and 1")
    mix = mix if sampler == "logit-mix" else 0.0
    capacity = backend.seq_len or len(prompt) + gen_length + 2 * block
    if len(prompt) + gen_length > capacity:
        raise DllmExportError(
            f"draft-and-verify decoding of {gen_length} tokens after a {len(prompt)}-token "
            f"prompt needs {len(prompt) + gen_length} cache slots; the artifact holds "
            f"{capacity} (re-export with a larger --seq-len)")
    rows = backend.rows_for(2 * block)
    rng = np.random.default_rng(seed)
    stats = TidarStats()
    backend.reset_cache(1, capacity)
    canvas = np.full((1, capacity), pad_id, dtype=np.int64)
    canvas[0, :len(prompt)] = prompt
    real = np.ones((1, capacity), dtype=bool)
    positions = rope_positions(real, positions_rule)
    valid = np.zeros((1, capacity), dtype=bool)
    end = len(prompt) + gen_length

    # the prompt, causally: its keys and values, and the first certain token
    ids = np.full((1, rows), pad_id, dtype=np.int64)
    rope = np.zeros((1, rows), dtype=np.int64)
    done = 0
    while done < len(prompt):  # chunks of ``rows``: a long prompt costs a few forwards
        count = min(rows, len(prompt) - done)
        ids[:] = pad_id
        ids[0, :count] = prompt[done:done + count]
        rope[:] = 0
        rope[0, :count] = positions[0, done:done + count]
        first = draft_verify_mask(np.arange(done, done + count), np.array([], dtype=np.int64),
                                  rows, valid, real)
        started = time.perf_counter()
        pred = backend.cached_step(ids, rope, first, write=(0, done, count))
        stats.forward_seconds.append(time.perf_counter() - started)
        stats.forwards += 1
        valid[0, done:done + count] = True
        done += count
    target = _target(pred.topk_logprobs[0, count - 1], pred.topk_ids[0, count - 1],
                     temperature, 0.0)
    pending = [_sample(pred.topk_ids[0, count - 1], target, rng)]
    drafts_q: list[dict] = []  # the draft distribution of each pending draft
    n = len(prompt)  # position of pending[0]
    while n < end:
        pending = pending[:end - n]
        m = len(pending) - 1
        base = n + m + 1  # the mask block's first position
        masks = np.arange(base, min(base + block, capacity))
        mask_rows = masks.size
        query = np.arange(n, n + m + 1)
        attention_mask = draft_verify_mask(query, masks, rows, valid, real, block)
        ids[:] = pad_id
        rope[:] = 0
        ids[0, :m + 1] = pending
        rope[0, :m + 1] = positions[0, query]
        ids[0, block:block + mask_rows] = mask_id
        rope[0, block:block + mask_rows] = positions[0, masks]
        started = time.perf_counter()
        pred = backend.cached_step(ids, rope, attention_mask, write=None)
        stats.forward_seconds.append(time.perf_counter() - started)
        stats.forwards += 1
        top_ids, top_lp = pred.topk_ids[0], pred.topk_logprobs[0]

        def draft_of(position, base=base, mask_rows=mask_rows):  # the mask row drafting ``position``, or None
            row = position - base - int(draft_shift)
            return None if not 0 <= row < mask_rows else block + row

        accepted, certain = 1, None
        for i in range(1, m + 1):  # verify pending[i] with the prediction of row i - 1
            draft_row = drafts_q[i - 1] if i - 1 < len(drafts_q) else None
            target = _target(top_lp[i - 1], top_ids[i - 1], temperature, mix,
                             draft_row and draft_row["top"])
            if temperature <= 0:
                if pending[i] == int(top_ids[i - 1][int(np.argmax(target))]):
                    accepted += 1
                    continue
                certain = int(top_ids[i - 1][int(np.argmax(target))])
                break
            ok, token = _verify(pending[i], draft_row["q"] if draft_row else {},
                                top_ids[i - 1], target, rng)
            if ok:
                accepted += 1
                continue
            certain = token
            break
        # keep pending[:accepted]: their rows' keys and values are exact
        backend.commit((0, n, accepted))
        canvas[0, n:n + accepted] = pending[:accepted]
        valid[0, n:n + accepted] = True
        stats.accepted.append(accepted)
        committed = pending[:accepted]
        if on_step is not None:  # (first generated index, tokens, forward seconds)
            on_step(n - len(prompt), committed, stats.forward_seconds[-1])
        n += accepted
        if early_exit and any(t in eos_ids for t in committed):
            break
        if certain is None:  # every draft passed: the row after the last one predicts n
            row = accepted - 1
            draft_row = draft_of(n)
            draft = (top_ids[draft_row], top_lp[draft_row]) if draft_row is not None else None
            target = _target(top_lp[row], top_ids[row], temperature, mix, draft)
            certain = _sample(top_ids[row], target, rng)
            pending, drafts_q = [certain], []
            for position in range(n + 1, n + block):
                draft_row = draft_of(position)
                if draft_row is None:
                    break
                q = _draft_distribution(top_lp[draft_row], temperature)
                pending.append(_sample(top_ids[draft_row], q, rng))
                drafts_q.append({"q": dict(zip(top_ids[draft_row].tolist(), q.tolist(), strict=False)),
                                 "top": (top_ids[draft_row], top_lp[draft_row])})
        else:
            pending, drafts_q = [certain], []
    return canvas[0, len(prompt):end].tolist(), stats
