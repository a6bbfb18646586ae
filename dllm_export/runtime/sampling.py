"""Per-step decisions over numpy arrays: candidate tokens, confidences, schedules, selection.

Faithful to the published reference code:
* LLaDA ``generate.py``: Gumbel-max temperature, ``low_confidence`` / ``random`` remasking,
  ``logits_eos_inf``, ``confidence_eos_eot_inf``, the linear transfer schedule.
* Dream ``generation_utils.py``: ``sample_tokens`` with top-p / top-k, the maskgit_plus,
  topk_margin and entropy confidences, the ``1 - s/t`` schedule on float32 timesteps.
* Fast-dLLM ``get_transfer_index``: commit every candidate at or above a threshold, and
  always the most confident one.
"""

from __future__ import annotations

import numpy as np

from dllm_export.runtime.prediction import ENTROPY_EPS, Prediction

NEG_INF = -np.inf


def _excluding(pred: Prediction, excluded: list[int]):
    """Top-K log-probabilities renormalised with ``excluded`` tokens removed.

    Matches setting those logits to -inf before the softmax: the removed mass comes from the
    exact special-token log-probabilities, so this is exact on the full vocabulary.
    """
    logprobs = pred.topk_logprobs.astype(np.float64)
    if not excluded:
        return logprobs
    mass = sum(np.exp(pred.special(t).astype(np.float64)) for t in dict.fromkeys(excluded))
    logprobs = logprobs - np.log1p(-np.minimum(mass, 1.0 - 1e-12))[..., None]
    hidden = np.isin(pred.topk_ids, excluded)
    return np.where(hidden, NEG_INF, logprobs)


def llada_candidates(pred: Prediction, temperature: float, remasking: str, rng,
                     eos_id: int, eot_id: int | None, logits_eos_inf: bool,
                     confidence_eos_eot_inf: bool):
    """LLaDA's x0 and confidence per position: ([B, L] int64, [B, L] float64)."""
    sampling = [eos_id] if logits_eos_inf else []
    logprobs = _excluding(pred, sampling)
    if temperature == 0:
        choice = logprobs.argmax(axis=-1)
    else:  # Gumbel-max: argmax(l/T + g) samples softmax(l/T); here over the top-K
        gumbel = rng.gumbel(size=logprobs.shape)
        choice = (logprobs / temperature + gumbel).argmax(axis=-1)
    x0 = np.take_along_axis(pred.topk_ids, choice[..., None], axis=-1)[..., 0]
    if remasking == "random":
        return x0, rng.random(x0.shape)
    if confidence_eos_eot_inf:
        # The reference writes -inf into the noised logits (EOS) and the logits (EoT) in one
        # statement; at temperature 0 those are the same tensor, so both EOS and EoT leave the
        # softmax, while with noise only EoT does.
        hidden = sampling + ([eot_id] if eot_id is not None else [])
        if temperature == 0:
            hidden.append(eos_id)
        logprobs = _excluding(pred, hidden)
    confidence = np.exp(np.take_along_axis(logprobs, choice[..., None], axis=-1)[..., 0])
    return x0, confidence


def _dream_truncated(logprobs, temperature: float, top_p, top_k):
    """Dream's temperature / top-p / top-k on the top-K candidates; returns probabilities."""
    if temperature > 0:
        logits = logprobs / temperature
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
    else:  # untempered: the top-K log-probabilities are the exact full-vocab values
        probs = np.exp(logprobs)
    keep = np.ones(probs.shape, dtype=bool)
    if top_p is not None and top_p < 1:
        cumulative = np.cumsum(probs, axis=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].copy()  # keep the first token past the threshold
        remove[..., 0] = False
        keep &= ~remove
    if top_k is not None:
        keep[..., top_k:] = False
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum(axis=-1, keepdims=True)


def dream_candidates(pred: Prediction, alg: str, temperature: float, top_p, top_k, rng):
    """Dream's ``sample_tokens``: (confidence [B, L] float64, x0 [B, L] int64)."""
    exact = temperature == 0 and (top_p is None or top_p >= 1) and top_k is None
    logprobs = pred.topk_logprobs.astype(np.float64)
    if exact:
        x0 = pred.topk_ids[..., 0]
        top1 = np.exp(logprobs[..., 0])
        if alg == "topk_margin":
            return top1 - np.exp(logprobs[..., 1]), x0
        if alg == "entropy":
            return pred.neg_entropy.astype(np.float64), x0
        return top1, x0
    probs = _dream_truncated(logprobs, temperature, top_p, top_k)
    if temperature > 0:
        cumulative = np.cumsum(probs, axis=-1)
        draw = rng.random(probs.shape[:-1] + (1,))
        choice = np.minimum((cumulative < draw).sum(axis=-1), probs.shape[-1] - 1)
    else:
        choice = probs.argmax(axis=-1)
    x0 = np.take_along_axis(pred.topk_ids, choice[..., None], axis=-1)[..., 0]
    confidence = np.take_along_axis(probs, choice[..., None], axis=-1)[..., 0]
    if alg == "topk_margin":
        ordered = -np.sort(-probs, axis=-1)
        confidence = ordered[..., 0] - ordered[..., 1]
    elif alg == "entropy":
        confidence = (probs * np.log(probs + ENTROPY_EPS)).sum(axis=-1)
    return confidence, x0


def llada_transfer_counts(mask_counts: np.ndarray, steps: int) -> np.ndarray:
    """LLaDA's linear schedule: [B, steps] counts, the remainder spread over the first steps."""
    base = mask_counts // steps
    remainder = mask_counts % steps
    counts = np.repeat(base[:, None], steps, axis=1)
    counts += np.arange(steps)[None, :] < remainder[:, None]
    return counts.astype(np.int64)


def torch_linspace_f32(start: float, end: float, count: int) -> np.ndarray:
    """``torch.linspace(start, end, count)`` in float32, element for element.

    torch fills the first half as ``start + step * i`` and the second half as
    ``end - step * (count - 1 - i)``, each a fused multiply-add rounded once to float32.
    Dream's transfer counts truncate products of these values, so the last bit matters.
    """
    if count == 1:
        return np.array([start], dtype=np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(count - 1))
    index = np.arange(count, dtype=np.float64)
    # In float64 the products (a float32 times an integer below 2**24) are exact, and so
    # are the sums while no term is below 1e-9 of the largest (Dream: 1 .. eps >= 1e-9),
    # so the one rounding to float32 below is the fused multiply-add's.
    first = np.float64(start32) + step * index
    second = np.float64(end32) - step * (count - 1 - index)
    return np.where(index < count // 2, first, second).astype(np.float32)


def select_top(confidence: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row, the ``counts[row]`` most confident positions (ties: lower index first)."""
    order = np.argsort(-confidence, axis=1, kind="stable")
    chosen = np.zeros(confidence.shape, dtype=bool)
    for row, count in enumerate(counts):
        if count > 0:
            chosen[row, order[row, :count]] = True
    return chosen & np.isfinite(confidence)


def select_threshold(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """Fast-dLLM: every candidate at or above ``threshold``, plus each row's best one."""
    chosen = confidence >= threshold
    best = confidence.argmax(axis=1)
    rows = np.arange(confidence.shape[0])
    chosen[rows, best] |= np.isfinite(confidence[rows, best])
    return chosen


def sample_positions(confidence: np.ndarray, counts, temperature: float, rng) -> np.ndarray:
    """Dream's ``alg_temp``: draw positions from softmax(confidence / alg_temp), no repeats."""
    chosen = np.zeros(confidence.shape, dtype=bool)
    for row, count in enumerate(counts):
        scores = confidence[row] / temperature
        finite = np.isfinite(scores)
        if count <= 0 or not finite.any():
            continue
        weights = np.exp(scores - scores[finite].max()) * finite
        picks = rng.choice(len(scores), size=min(count, int(finite.sum())), replace=False,
                           p=weights / weights.sum())
        chosen[row, picks] = True
    return chosen
