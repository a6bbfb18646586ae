"""What the unmasking loop needs from one denoiser forward, per position.

The decode head (in the exported graph, or ``summarize_logits`` here for full-logit
backends) reduces each position's distribution over the vocabulary to a few numbers,
computed in float32 over the whole vocabulary:

| output            | shape      | meaning                                                    |
|-------------------|------------|------------------------------------------------------------|
| topk_ids          | [B, L, K]  | the K most likely tokens, best first                       |
| topk_logprobs     | [B, L, K]  | their log-probabilities (log-softmax over all V)           |
| neg_entropy       | [B, L]     | sum_v p_v log(p_v + 1e-10), Dream's entropy confidence     |
| special_logprobs  | [B, L, S]  | log-probabilities of the special ids (EOS, EoT) for exact   |
|                   |            | EOS/EoT suppression                                        |

With these, every sampler here is exact at temperature 0 (argmax, its probability, the
top-1/top-2 margin, negative entropy, EOS/EoT suppression), and temperature sampling draws
from the top-K candidates. A step moves (2K + S + 1) numbers per position instead of V.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENTROPY_EPS = 1e-10  # Dream's sample_tokens adds this inside the log


@dataclass
class Prediction:
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    neg_entropy: np.ndarray
    special_logprobs: np.ndarray
    special_ids: tuple[int, ...]

    def special(self, token_id: int) -> np.ndarray:
        """Log-probability [B, L] of one special id."""
        return self.special_logprobs[..., self.special_ids.index(token_id)]

    def positions(self, start: int, stop: int) -> "Prediction":
        """Positions ``start:stop`` (axis 1) of every row."""
        return Prediction(
            self.topk_ids[:, start:stop],
            self.topk_logprobs[:, start:stop],
            self.neg_entropy[:, start:stop],
            self.special_logprobs[:, start:stop],
            self.special_ids,
        )

    def rows(self, count: int) -> "Prediction":
        """The first ``count`` batch rows (backends pad the batch to the engine's size)."""
        return Prediction(
            self.topk_ids[:count],
            self.topk_logprobs[:count],
            self.neg_entropy[:count],
            self.special_logprobs[:count],
            self.special_ids,
        )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def summarize_logits(logits: np.ndarray, k: int, special_ids: tuple[int, ...]) -> Prediction:
    """The decode head in numpy, for backends that return full logits (and for CFG)."""
    logprobs = log_softmax(logits)
    k = min(k, logprobs.shape[-1])
    top = np.argpartition(-logprobs, k - 1, axis=-1)[..., :k]
    top_lp = np.take_along_axis(logprobs, top, axis=-1)
    order = np.argsort(-top_lp, axis=-1, kind="stable")
    topk_ids = np.take_along_axis(top, order, axis=-1).astype(np.int64)
    topk_logprobs = np.take_along_axis(top_lp, order, axis=-1)
    probs = np.exp(logprobs)
    neg_entropy = (probs * np.log(probs + ENTROPY_EPS)).sum(axis=-1).astype(np.float32)
    special = logprobs[..., list(special_ids)] if special_ids else logprobs[..., :0]
    return Prediction(topk_ids, topk_logprobs, neg_entropy, special, tuple(special_ids))
