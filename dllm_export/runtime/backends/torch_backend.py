"""The PyTorch reference backend: a loaded checkpoint, eager, any canvas length.

This is the only runtime module that imports torch, and only when it is used.
"""

from __future__ import annotations

import numpy as np

from dllm_export.runtime.backends.base import Backend
from dllm_export.runtime.prediction import Prediction


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, special_ids: tuple[int, ...], topk: int = 8, device: str = "cpu"):
        import torch

        from dllm_export.models.head import DecodeHead, canvas_logits

        self.torch = torch
        self.canvas_logits = canvas_logits
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.head = DecodeHead(topk, special_ids)
        self.topk = topk
        self.special_ids = tuple(special_ids)

    def _logits_tensor(self, input_ids, attention_mask):
        torch = self.torch
        ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask)).to(self.device)
        with torch.inference_mode():
            return self.canvas_logits(self.model, ids, mask)

    def _run_predict(self, input_ids, attention_mask) -> Prediction:
        with self.torch.inference_mode():
            outputs = self.head(self._logits_tensor(input_ids, attention_mask))
        ids, logprobs, entropy, special = (t.cpu().numpy() for t in outputs)
        return Prediction(ids, logprobs, entropy, special, self.special_ids)

    def _run_logits(self, input_ids, attention_mask):
        return self._logits_tensor(input_ids, attention_mask).cpu().numpy()

    # The cache is a list per layer of its states ((keys, values) [B, Hkv, C, Dh], after any
    # other state the family keeps) on the model's device.
    has_cached_graphs = True

    def reset_cache(self, batch: int, capacity: int) -> None:
        self.capacity, self.kv = capacity, None

    def rows_for(self, needed: int) -> int:
        return needed  # eager: any number of queries

    def max_rows(self) -> int | None:
        return None

    def _call(self, input_ids, position_ids, attention_mask, past):
        from dllm_export.models.layers import KVCache

        torch = self.torch
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
                   for a in (input_ids, position_ids, attention_mask)]
        cache = KVCache(past, len(getattr(self.model, "cache_kinds", ("key", "value"))))
        with torch.inference_mode():
            logits = self.model(tensors[0], positions=tensors[1], visible=tensors[2], cache=cache)
            ids, logprobs, entropy, special = (t.cpu().numpy() for t in self.head(logits))
        return Prediction(ids, logprobs, entropy, special, self.special_ids), cache.presents

    def _run_prefill(self, input_ids, position_ids, attention_mask) -> Prediction:
        if input_ids.shape[1] != self.capacity:
            raise ValueError(f"prefill of {input_ids.shape[1]} positions, cache of {self.capacity}")
        pred, presents = self._call(input_ids, position_ids, attention_mask, None)
        self.kv = [tuple(t.clone() for t in states) for states in presents]
        return pred

    def _empty_cache(self, input_ids, position_ids):
        """Zeros of every layer's cache shape (learnt from a one-token call), for a cached
        call that comes before any prefill (a chunked prompt)."""
        torch = self.torch
        one = np.ones((input_ids.shape[0], 1, 1), dtype=bool)
        _, presents = self._call(input_ids[:, :1], position_ids[:, :1], one, None)
        shape = lambda t: (*t.shape[:2], self.capacity, t.shape[3])
        self.kv = [tuple(torch.zeros(shape(t), dtype=t.dtype, device=t.device) for t in states)
                   for states in presents]

    def _run_cached_step(self, input_ids, position_ids, attention_mask, write) -> Prediction:
        if self.kv is None:
            self._empty_cache(input_ids, position_ids)
        pred, self._last_presents = self._call(input_ids, position_ids, attention_mask, self.kv)
        if write is not None:
            self.commit(write)
        return pred

    def commit(self, write) -> None:
        row, slot, count = write
        for states, new_states in zip(self.kv, self._last_presents, strict=True):
            for state, new in zip(states, new_states, strict=True):
                state[:, :, slot:slot + count] = new[:, :, row:row + count]
