"""The Monte-Carlo ELBO of a response given a prompt, as LLaDA's evaluation estimates it.

The response is a sequence's region, target then tail (``canvas.py``): for the tasks the
answer, end of turn and EOS filler of the generation canvas; for lm-eval the
continuation. For each sequence, ``mc_num`` noisy copies are drawn in groups of
``mc_batch``. A group draws k ~ U{1..T} (T region tokens) and spreads its mask counts
evenly over the group, ``round(linspace(k, k + (b-1) T/b, b))`` wrapped into 1..T, so one
group covers the mask ratios evenly (stratified sampling). Each copy masks that many
region tokens, chosen at random; the prompt is never masked. A copy scores the
cross-entropy of its masked tokens (log-softmax of the full logits) divided by its mask
ratio count/T, and the estimate is

    log p(region | prompt) >= -(1 / mc_num) * sum over copies of that weighted loss

(LLaDA's ``get_log_likelihood``: the mean over groups of the group sum divided by b).
Reported as bits per target token (per answer token, end of turn included):
-log-likelihood / ln 2 over the target tokens, pooled over sequences.
"""

from __future__ import annotations

import math

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.eval.canvas import (
    ScoredSequence,
    canvas_length,
    pack,
    region_positions,
)


def stratified_mask_counts(k: int, target_len: int, batch: int) -> np.ndarray:
    """Mask counts for one group of ``batch`` copies starting at ``k``, each in 1..T."""
    spread = np.round(np.linspace(k, k + (batch - 1) * (target_len / batch), batch))
    return ((spread.astype(np.int64) - 1) % target_len) + 1


def noisy_copies(rng, row: np.ndarray, positions: np.ndarray, mc_num: int, mc_batch: int,
                 mask_id: int):
    """``mc_num`` masked copies of one canvas row. Returns (copies [mc_num, L], masked
    [mc_num, L] bool, mask ratio per copy [mc_num])."""
    target_len = len(positions)
    counts = np.concatenate([
        stratified_mask_counts(int(rng.integers(1, target_len + 1)), target_len, mc_batch)
        for _ in range(mc_num // mc_batch)])
    masked = np.zeros((mc_num, row.shape[0]), dtype=bool)
    for copy, count in enumerate(counts):
        masked[copy, positions[rng.permutation(target_len)[:count]]] = True
    copies = np.where(masked, mask_id, row[None, :])
    return copies, masked, counts / target_len


def masked_cross_entropy(logits: np.ndarray, input_ids: np.ndarray, masked: np.ndarray):
    """Per row, the summed cross-entropy (nats) of the true tokens at masked positions.

    ``input_ids`` holds the true tokens (not the masked copy)."""
    rows, cols = np.nonzero(masked)
    picked = logits[rows, cols].astype(np.float64)  # [n, V], only the masked positions
    top = picked.max(axis=-1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(picked - top).sum(axis=-1))
    loss = log_norm - picked[np.arange(len(rows)), input_ids[rows, cols]]
    return np.bincount(rows, weights=loss, minlength=logits.shape[0])


def check_mc(mc_num: int, mc_batch: int) -> int:
    """The group size actually used (at most mc_num); refuses counts that do not divide."""
    if mc_num < 1:
        raise DllmExportError(f"--mc-num {mc_num}: use at least 1 Monte-Carlo sample")
    mc_batch = min(mc_batch, mc_num)
    if mc_num % mc_batch:
        raise DllmExportError(
            f"--mc-num {mc_num} must be a multiple of the Monte-Carlo group size {mc_batch}")
    return mc_batch


def elbo(models, sequences: list[ScoredSequence], mc_num: int, mc_batch: int,
         seed: int, seq_len: int | None) -> list[np.ndarray]:
    """Log-likelihood estimates (nats) per sequence, for every model on identical copies.

    Args:
        models: objects with ``logits(input_ids, attention_mask)``, ``special`` and
            ``batch`` (rows per forward).
        sequences: prompts, targets (at least one token) and tails.
        mc_num: Monte-Carlo copies per sequence; mc_batch: stratification group size.
        seed: seeds the mask counts and positions.
        seq_len: fixed canvas length, or None (each forward as long as its longest row).
    Returns:
        One array [len(sequences)] per model.
    """
    if any(not s.target for s in sequences):
        raise DllmExportError("the ELBO needs a target of at least one token")
    mc_batch = check_mc(mc_num, mc_batch)
    special = models[0].special
    rng = np.random.default_rng(seed)
    results = [np.zeros(len(sequences)) for _ in models]
    # Copies of a few sequences share each forward, enough to fill the largest batch;
    # without a fixed length each chunk is only as long as its longest sequence.
    per_chunk = max(1, max(m.batch for m in models) // mc_num)
    for start in range(0, len(sequences), per_chunk):
        chunk = range(start, min(start + per_chunk, len(sequences)))
        members = [sequences[i] for i in chunk]
        length = canvas_length(members, seq_len)
        ids, attention = pack(members, length, special.pad_id)
        drawn = [noisy_copies(rng, ids[row], np.concatenate(region_positions(member, length)),
                              mc_num, mc_batch, special.mask_id)
                 for row, member in enumerate(members)]
        copies = np.concatenate([d[0] for d in drawn])
        masked = np.concatenate([d[1] for d in drawn])
        ratio = np.concatenate([d[2] for d in drawn])
        truth = np.repeat(ids, mc_num, axis=0)
        rows_attention = np.repeat(attention, mc_num, axis=0)
        for model, result in zip(models, results, strict=True):
            step = model.batch  # one forward at a time keeps only [batch, L, V] logits
            losses = np.concatenate([
                masked_cross_entropy(
                    model.logits(copies[r:r + step], rows_attention[r:r + step]),
                    truth[r:r + step], masked[r:r + step])
                for r in range(0, len(copies), step)])
            weighted = (losses / ratio).reshape(len(chunk), mc_num)
            result[list(chunk)] = -weighted.sum(axis=1) / mc_num
    return results


def bits_per_token(log_likelihoods: np.ndarray, sequences: list[ScoredSequence]) -> float:
    """Pooled over sequences: total -log2 likelihood of the regions over total target
    tokens (the tail's cost is counted, its tokens are not)."""
    tokens = sum(len(s.target) for s in sequences)
    return float(-np.sum(log_likelihoods) / math.log(2) / max(tokens, 1))
