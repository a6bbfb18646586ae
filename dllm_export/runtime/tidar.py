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

SAMPLERS = ("lossless", "logit-mix", "block", "autoregressive")
DEFAULT_THRESHOLD = 0.9  # block: commit every masked position at least this confident


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


class _Canvas:
    """One sequence's cache bookkeeping: the canvas, RoPE positions and the valid slots."""

    def __init__(self, backend, prompt: list[int], gen_length: int, block: int, pad_id: int,
                 positions_rule: str, what: str):
        capacity = backend.seq_len or len(prompt) + gen_length + 2 * block
        if len(prompt) + gen_length > capacity:
            raise DllmExportError(
                f"{what} of {gen_length} tokens after a {len(prompt)}-token prompt needs "
                f"{len(prompt) + gen_length} cache slots; the artifact holds {capacity} "
                "(re-export with a larger --seq-len)")
        self.capacity = capacity
        backend.reset_cache(1, capacity)
        self.tokens = np.full((1, capacity), pad_id, dtype=np.int64)
        self.tokens[0, :len(prompt)] = prompt
        self.real = np.ones((1, capacity), dtype=bool)
        self.positions = rope_positions(self.real, positions_rule)
        self.valid = np.zeros((1, capacity), dtype=bool)


def _prefill(backend, canvas: _Canvas, prompt: list[int], rows: int, pad_id: int,
             stats: "TidarStats"):
    """The prompt, causally, in chunks of ``rows``: writes its keys and values; returns the
    prediction of its last row's call and that row's index."""
    ids = np.full((1, rows), pad_id, dtype=np.int64)
    rope = np.zeros((1, rows), dtype=np.int64)
    done = 0
    while done < len(prompt):  # a long prompt costs a few forwards
        count = min(rows, len(prompt) - done)
        ids[:] = pad_id
        ids[0, :count] = prompt[done:done + count]
        rope[:] = 0
        rope[0, :count] = canvas.positions[0, done:done + count]
        first = draft_verify_mask(np.arange(done, done + count), np.array([], dtype=np.int64),
                                  rows, canvas.valid, canvas.real)
        started = time.perf_counter()
        pred = backend.cached_step(ids, rope, first, write=(0, done, count))
        stats.forward_seconds.append(time.perf_counter() - started)
        stats.forwards += 1
        canvas.valid[0, done:done + count] = True
        done += count
    return pred, count - 1


def tidar_decode(backend, prompt: list[int], gen_length: int, block: int, pad_id: int,
                 eos_ids=(), temperature: float = 0.0, sampler: str = "lossless",
                 mix: float = 0.5, draft_shift: bool = False, mask_id: int = 0,
                 positions_rule: str = "absolute", seed: int = 0, early_exit: bool = True,
                 on_step=None, threshold: float | None = None):
    """Decode ``gen_length`` tokens after ``prompt`` (one sequence). Returns (tokens,
    TidarStats). ``sampler`` ``block`` and ``autoregressive`` are the other two modes of the
    same model (``block_decode``, ``autoregressive_decode``)."""
    if sampler not in SAMPLERS:
        raise DllmExportError(f"--tidar-sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if not 0 <= mix <= 1:
        raise DllmExportError(f"--mix {mix}: must be between 0 and 1")
    if sampler == "autoregressive":
        return autoregressive_decode(backend, prompt, gen_length, pad_id, eos_ids, temperature,
                                     positions_rule, seed, early_exit, on_step)
    if sampler == "block":
        return block_decode(backend, prompt, gen_length, block, pad_id, eos_ids, temperature,
                            draft_shift, mask_id, positions_rule, seed, early_exit, on_step,
                            DEFAULT_THRESHOLD if threshold is None else threshold)
    mix = mix if sampler == "logit-mix" else 0.0
    rows = backend.rows_for(2 * block)
    rng = np.random.default_rng(seed)
    stats = TidarStats()
    canvas = _Canvas(backend, prompt, gen_length, block, pad_id, positions_rule,
                     "draft-and-verify decoding")
    capacity, positions, valid, real = (canvas.capacity, canvas.positions, canvas.valid,
                                        canvas.real)
    end = len(prompt) + gen_length
    pred, last = _prefill(backend, canvas, prompt, rows, pad_id, stats)
    ids = np.full((1, rows), pad_id, dtype=np.int64)
    rope = np.zeros((1, rows), dtype=np.int64)
    target = _target(pred.topk_logprobs[0, last], pred.topk_ids[0, last], temperature, 0.0)
    pending = [_sample(pred.topk_ids[0, last], target, rng)]
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
        canvas.tokens[0, n:n + accepted] = pending[:accepted]
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
    return canvas.tokens[0, len(prompt):end].tolist(), stats


def _confident(top_ids, top_logprobs, temperature: float, rng):
    """A row's token and its probability: the argmax at temperature 0, else a sample from
    the tempered top-K."""
    probs = _draft_distribution(top_logprobs, temperature)
    token = _sample(top_ids, probs, rng)
    full = np.exp(top_logprobs.astype(np.float64))
    return token, float(full[list(top_ids).index(token)])


def block_decode(backend, prompt: list[int], gen_length: int, block: int, pad_id: int,
                 eos_ids=(), temperature: float = 0.0, draft_shift: bool = True,
                 mask_id: int = 0, positions_rule: str = "absolute", seed: int = 0,
                 early_exit: bool = True, on_step=None, threshold: float = DEFAULT_THRESHOLD):
    """Block diffusion over the exact causal cache, in the draft-and-verify graph.

    Each block of ``block`` positions is denoised by its mask rows (attending to the cache,
    the finished block before it and itself); every masked position at least
    ``threshold`` confident is committed per forward (at least the most confident one).
    The first forward of a block also carries the finished block before it, verified
    causally: its keys and values go into the cache (so the cache stays exact) and its last
    row's next-token prediction commits the block's first position, as autoregressive
    decoding would. So a block costs its denoising forwards and nothing else.
    """
    if not draft_shift:
        raise DllmExportError(
            "--tidar-sampler block takes each block's first token from the causal row "
            "before it, so its rows must predict the next position (draft_shift true in "
            "the checkpoint's generation config)")
    rows = backend.rows_for(2 * block)
    rng = np.random.default_rng(seed)
    stats = TidarStats()
    canvas = _Canvas(backend, prompt, gen_length, block, pad_id, positions_rule,
                     "block decoding")
    end = len(prompt) + gen_length
    pred, last = _prefill(backend, canvas, prompt, rows, pad_id, stats)
    first, _ = _confident(pred.topk_ids[0, last], pred.topk_logprobs[0, last], temperature,
                          rng)
    ids = np.full((1, rows), pad_id, dtype=np.int64)
    rope = np.zeros((1, rows), dtype=np.int64)
    n = len(prompt)  # the first position not in the cache
    pending = [first]  # tokens at n.. decided but not yet in the cache
    while n + len(pending) < end:
        base = n + len(pending)
        width = min(block, end - base)
        tokens = np.full(width, mask_id, dtype=np.int64)
        filled = np.zeros(width, dtype=bool)
        while not filled.all():
            query = np.arange(n, n + len(pending))
            ids[:] = pad_id
            rope[:] = 0
            ids[0, :len(pending)] = pending
            rope[0, :len(pending)] = canvas.positions[0, query]
            ids[0, block:block + width] = tokens
            rope[0, block:block + width] = canvas.positions[0, base:base + width]
            mask = draft_verify_mask(query, np.arange(base, base + width), rows, canvas.valid,
                                     canvas.real, block)
            started = time.perf_counter()
            pred = backend.cached_step(ids, rope, mask, write=None)
            seconds = time.perf_counter() - started
            stats.forward_seconds.append(seconds)
            stats.forwards += 1
            top_ids, top_lp = pred.topk_ids[0], pred.topk_logprobs[0]
            chosen = np.zeros(width, dtype=bool)
            committed = list(pending)
            if pending:  # the finished block joins the cache; its last row gives position base
                backend.commit((0, n, len(pending)))
                canvas.tokens[0, n:base] = pending
                canvas.valid[0, n:base] = True
                row = len(pending) - 1
                tokens[0], _ = _confident(top_ids[row], top_lp[row], temperature, rng)
                filled[0] = chosen[0] = True
                n, pending = base, []
            confidence = np.full(width, -1.0)
            proposal = np.zeros(width, dtype=np.int64)
            for j in range(1, width):  # block row j - 1 predicts position base + j
                if not filled[j]:
                    proposal[j], confidence[j] = _confident(
                        top_ids[block + j - 1], top_lp[block + j - 1], temperature, rng)
            pick = (confidence >= threshold) & ~filled
            if not pick.any() and not chosen.any():
                pick[int(np.argmax(confidence))] = True
            tokens[pick] = proposal[pick]
            filled |= pick
            chosen |= pick
            if on_step is not None:  # (first generated index, tokens, forward seconds)
                on_step(n - len(prompt) if not committed else n - len(prompt) - len(committed),
                        committed, seconds)
            stats.accepted.append(int(chosen.sum()))
            answer_end = _ended(tokens, filled, eos_ids)
            if early_exit and answer_end is not None:
                canvas.tokens[0, base:base + width] = tokens
                return _finish(canvas, prompt, end, base + answer_end, eos_ids), stats
        pending = tokens.tolist()
    canvas.tokens[0, n:n + len(pending)] = pending
    return canvas.tokens[0, len(prompt):end].tolist(), stats


def _ended(tokens, filled, eos_ids):
    """The index of the first EOS when every position before it is filled, else None."""
    for j, (token, known) in enumerate(zip(tokens.tolist(), filled.tolist(), strict=True)):
        if not known:
            return None
        if token in eos_ids:
            return j
    return None


def _finish(canvas, prompt, end, stop, eos_ids):
    """The answer up to ``stop`` (an EOS), EOS after it."""
    out = canvas.tokens[0, len(prompt):end].copy()
    out[stop - len(prompt):] = next(iter(eos_ids))
    out[stop - len(prompt)] = canvas.tokens[0, stop]
    return out.tolist()


def autoregressive_decode(backend, prompt: list[int], gen_length: int, pad_id: int,
                          eos_ids=(), temperature: float = 0.0,
                          positions_rule: str = "absolute", seed: int = 0,
                          early_exit: bool = True, on_step=None):
    """One token per forward of the one-row decode graph (``autoregressive.py``), stopping
    at EOS: the same model decoded as an autoregressive server would."""
    from dllm_export.runtime.autoregressive import next_tokens

    rng = np.random.default_rng(seed)
    stats = TidarStats()
    out = []

    def choose(top_ids, top_logprobs):
        token, _ = _confident(top_ids, top_logprobs, temperature, rng)
        return token

    for token, seconds in next_tokens(backend, prompt, gen_length, pad_id, choose,
                                      positions_rule):
        stats.forward_seconds.append(seconds)
        stats.forwards += 1
        stats.accepted.append(1)
        out.append(token)
        if on_step is not None:
            on_step(len(out) - 1, [token], seconds)
        if early_exit and token in eos_ids:
            break
    filler = next(iter(eos_ids)) if eos_ids else pad_id
    return out + [filler] * (gen_length - len(out)), stats
