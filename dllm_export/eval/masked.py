"""Masked-token accuracy at fixed mask ratios, and top-1 agreement between models.

For each ratio r and sequence, round(r * T) of its T target tokens (answer and end of
turn; at least one) and round(r * F) of its F tail tokens (the EOS filler of the
response region) are replaced by the mask id, the same positions for every model; the
prompt is never masked. Only target positions are scored: accuracy is the share of masked
target positions whose top-1 prediction is the true token, pooled over sequences;
agreement is the share where two models' top-1 predictions match.
"""

from __future__ import annotations

import numpy as np

from dllm_export.eval.canvas import (
    ScoredSequence,
    canvas_length,
    pack,
    region_positions,
)

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def ratio_key(ratio: float) -> str:
    return f"{ratio:g}"


def mask_at_ratio(rng: np.random.Generator, ids: np.ndarray, sequences, ratio: float,
                  mask_id: int):
    """Returns (masked copy of ``ids``, masked [B, L] bool, scored [B, L] bool)."""
    length = ids.shape[1]
    masked = np.zeros(ids.shape, dtype=bool)
    scored = np.zeros(ids.shape, dtype=bool)
    for row, sequence in enumerate(sequences):
        target, tail = region_positions(sequence, length)
        count = max(1, int(round(ratio * len(target))))
        scored[row, target[rng.permutation(len(target))[:count]]] = True
        count = int(round(ratio * len(tail)))
        masked[row, tail[rng.permutation(len(tail))[:count]]] = True
    masked |= scored
    return np.where(masked, mask_id, ids), masked, scored


def masked_accuracy(models, sequences: list[ScoredSequence], ratios, seed: int,
                    seq_len: int | None) -> dict:
    """Accuracy per model (and agreement of the first two) at each ratio.

    Args:
        models: objects with ``top1(input_ids, attention_mask)`` and ``special``.
        sequences: prompts, targets and tails.
        ratios: mask ratios in (0, 1].
        seed: seeds which positions are masked.
        seq_len: fixed canvas length, or None for the longest sequence.
    Returns:
        ``{ratio_key: {"positions": n, "accuracy": [per model], "agreement": float|None}}``
    """
    length = canvas_length(sequences, seq_len)
    ids, attention = pack(sequences, length, models[0].special.pad_id)
    rng = np.random.default_rng(seed)
    report = {}
    for ratio in ratios:
        noisy, _, scored = mask_at_ratio(rng, ids, sequences, ratio,
                                         models[0].special.mask_id)
        predictions = [m.top1(noisy, attention)[scored] for m in models]
        truth = ids[scored]
        report[ratio_key(ratio)] = {
            "positions": int(scored.sum()),
            "accuracy": [float(np.mean(p == truth)) for p in predictions],
            "agreement": (float(np.mean(predictions[0] == predictions[1]))
                          if len(predictions) > 1 else None),
        }
    return report
