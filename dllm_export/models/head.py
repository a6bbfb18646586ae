"""The decode head in PyTorch, and the modules the exporter traces.

See ``runtime/prediction.py`` for the head's outputs and ``dllm_export/contract.py`` for
every graph's inputs and outputs. Everything is float32 over the whole vocabulary,
whatever the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from dllm_export.models.layers import KVCache

ENTROPY_EPS = 1e-10
# Canvas rows per decode-head chunk. The head's float32 intermediates are [rows, vocab] each
# (log-probabilities, probabilities, their product); computed over chunks of rows, in turn,
# ONNX Runtime's memory planner reuses one chunk's buffers for the next, so a large
# vocabulary's canvas holds a few [HEAD_ROWS, vocab] tensors at a time instead of several
# [L, vocab] ones (docs/performance.md, "Peak memory"). Each row's outputs are the same.
HEAD_ROWS = 32


class DecodeHead(nn.Module):
    def __init__(self, k: int, special_ids: tuple[int, ...]):
        super().__init__()
        self.k = k
        self.special_ids = tuple(special_ids)

    def forward(self, logits: torch.Tensor):
        if logits.shape[-2] <= HEAD_ROWS:
            return self.summarize(logits)
        rows = logits.shape[-2]  # sliced one chunk at a time (a Split would make every chunk at once)
        chunks = [self.summarize(logits[..., start:min(start + HEAD_ROWS, rows), :])
                  for start in range(0, rows, HEAD_ROWS)]
        return tuple(torch.cat(outputs, dim=-2 if outputs[0].dim() == logits.dim() else -1)
                     for outputs in zip(*chunks, strict=True))

    def summarize(self, logits: torch.Tensor):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        topk_logprobs, topk_ids = torch.topk(logprobs, self.k, dim=-1, sorted=True)
        probs = logprobs.exp()
        neg_entropy = (probs * torch.log(probs + ENTROPY_EPS)).sum(dim=-1)
        special = logprobs[..., list(self.special_ids)]
        return topk_ids, topk_logprobs, neg_entropy, special


def canvas_logits(model, input_ids, attention_mask=None, **kwargs):
    """A full canvas' logits with row p predicting position p: the family's rows, shifted
    for families whose row p predicts p + 1 (Dream: row 0 keeps its own)."""
    logits = model(input_ids, attention_mask, **kwargs)
    if getattr(model, "shift_logits", False):
        return torch.cat((logits[:, :1], logits[:, :-1]), dim=1)
    return logits


class Denoiser(nn.Module):
    """The canvas graph: (input_ids, attention_mask) -> the four decode outputs, or logits."""

    def __init__(self, model: nn.Module, head: DecodeHead | None):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, input_ids, attention_mask):
        logits = canvas_logits(self.model, input_ids, attention_mask)
        if self.head is None:
            return logits
        return self.head(logits)


class RowsDenoiser(nn.Module):
    """The rows graph (contract.py): the canvas graph's forward with the decode head over
    the rows ``head_rows`` [W] only, as computed (for a shifted family row r predicts
    r + 1: the runtime passes the rows before the positions it wants): the final norm, the
    output projection and the head run on W rows instead of L, which for a large
    vocabulary is most of a step's work."""

    def __init__(self, model: nn.Module, head: DecodeHead):
        super().__init__()
        self.model = model  # the same attribute path as Denoiser: weights keep their names
        self.head = head

    def forward(self, input_ids, attention_mask, head_rows):
        return self.head(self.model(input_ids, attention_mask, rows=head_rows))


class CachedDenoiser(nn.Module):
    """The cached graphs (contract.py: prefill, step): one call of the family's forward
    over ``Lq`` queries that attend to ``[past | their own keys]`` under ``attention_mask``
    [B, Lq, C + Lq] (or [B, Lq, Lq] without past), returning the head's outputs for the
    rows as computed (no shift: the runtime places the window) and each layer's keys and
    values."""

    def __init__(self, model: nn.Module, head: DecodeHead | None, layers: int, with_past: bool):
        super().__init__()
        self.model = model  # the same attribute path as Denoiser: weights keep their names
        self.head = head
        self.layers = layers
        self.with_past = with_past

    def forward(self, input_ids, position_ids, attention_mask, *past):
        kinds = len(getattr(self.model, "cache_kinds", ("key", "value")))
        layers = [past[kinds * i:kinds * (i + 1)] for i in range(self.layers)] if past else None
        cache = KVCache(layers, kinds)
        logits = self.model(input_ids, positions=position_ids, visible=attention_mask, cache=cache)
        outputs = (logits,) if self.head is None else tuple(self.head(logits))
        return (*outputs, *(t for states in cache.presents for t in states))
