"""The one interface every backend implements (ONNX Runtime, TensorRT, PyTorch).

A backend runs the denoiser on a fixed-shape canvas and returns the decode head's
``Prediction``; backends that can also return full logits implement ``_run_logits``
(classifier-free guidance and parity checks need them).
"""

from __future__ import annotations

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.runtime.prediction import Prediction


class Backend:
    name = "backend"
    seq_len: int | None = None  # fixed canvas length, or None when any length runs
    batch_size: int | None = None  # fixed batch, or None
    topk: int = 8
    special_ids: tuple[int, ...] = ()

    def _run_predict(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> Prediction:
        raise NotImplementedError

    def _run_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise DllmExportError(
            f"the {self.name} backend has no logits output; classifier-free guidance and "
            "logit parity need an artifact exported with --outputs logits"
        )

    def _padded(self, input_ids, attention_mask):
        """Repeat the first row up to the engine's fixed batch size."""
        rows = input_ids.shape[0]
        if self.batch_size is None or rows == self.batch_size:
            return input_ids, attention_mask, rows
        extra = self.batch_size - rows
        input_ids = np.concatenate([input_ids, np.repeat(input_ids[:1], extra, axis=0)])
        attention_mask = np.concatenate([attention_mask, np.repeat(attention_mask[:1], extra, axis=0)])
        return input_ids, attention_mask, rows

    def predict(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> Prediction:
        input_ids, attention_mask, rows = self._padded(input_ids, attention_mask)
        return self._run_predict(input_ids, attention_mask).rows(rows)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        input_ids, attention_mask, rows = self._padded(input_ids, attention_mask)
        return self._run_logits(input_ids, attention_mask)[:rows]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
