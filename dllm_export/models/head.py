"""The decode head in PyTorch: exported into the graph and used by the torch backend.

See ``runtime/prediction.py`` for the contract. Everything is float32 over the whole
vocabulary, whatever the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

ENTROPY_EPS = 1e-10


class DecodeHead(nn.Module):
    def __init__(self, k: int, special_ids: tuple[int, ...]):
        super().__init__()
        self.k = k
        self.special_ids = tuple(special_ids)

    def forward(self, logits: torch.Tensor):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        topk_logprobs, topk_ids = torch.topk(logprobs, self.k, dim=-1, sorted=True)
        probs = logprobs.exp()
        neg_entropy = (probs * torch.log(probs + ENTROPY_EPS)).sum(dim=-1)
        special = logprobs[..., list(self.special_ids)]
        return topk_ids, topk_logprobs, neg_entropy, special


class Denoiser(nn.Module):
    """Model + head: (input_ids, attention_mask) -> the four decode outputs, or logits."""

    def __init__(self, model: nn.Module, head: DecodeHead | None):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, input_ids, attention_mask):
        logits = self.model(input_ids, attention_mask)
        if self.head is None:
            return logits
        return self.head(logits)
