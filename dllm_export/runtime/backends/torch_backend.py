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

        from dllm_export.models.head import DecodeHead

        self.torch = torch
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
            return self.model(ids, mask)

    def _run_predict(self, input_ids, attention_mask) -> Prediction:
        with self.torch.inference_mode():
            outputs = self.head(self._logits_tensor(input_ids, attention_mask))
        ids, logprobs, entropy, special = (t.cpu().numpy() for t in outputs)
        return Prediction(ids, logprobs, entropy, special, self.special_ids)

    def _run_logits(self, input_ids, attention_mask):
        return self._logits_tensor(input_ids, attention_mask).cpu().numpy()
