"""The one interface every backend implements (ONNX Runtime, TensorRT, PyTorch).

A backend runs the denoiser on a fixed-shape canvas and returns the decode head's
``Prediction``; backends that can also return full logits implement ``_run_logits``
(classifier-free guidance and parity checks need them).

Backends with cached graphs (``contract.py``) also keep a key/value cache where it lives
(device buffers, OrtValues, tensors) and implement ``_run_prefill`` (a full canvas under
any attention mask; writes every slot) and ``_run_cached_step`` (a window of queries over
the cache; writes where told). Their predictions are the rows as computed: the runtime
(``cache.py``) places windows and applies a family's shift.
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
    row_shift: int = 0  # 1 when the model's row p predicts position p + 1 (Dream)

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

    def predict_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray, first: int,
                     count: int) -> Prediction:
        """The canvas prediction at positions ``first:first + count`` only. Backends whose
        artifact has the rows graph (contract.py) compute the head for those rows alone;
        the others run the canvas graph and keep the rows."""
        rows = self.head_rows(first, count)
        if rows is None:
            return self.predict(input_ids, attention_mask).positions(first, first + count)
        input_ids, attention_mask, batch = self._padded(input_ids, attention_mask)
        offset = first - int(rows[0])
        # the graph's rows as computed: a shifted family's position p is row p - 1 (and
        # position 0 its own row, as in the canvas graph)
        computed = np.maximum(rows - self.row_shift, 0)
        return self._run_rows(input_ids, attention_mask, computed).rows(batch).positions(
            offset, offset + count)

    def head_rows(self, first: int, count: int) -> np.ndarray | None:
        """The ``head_rows`` input that covers ``first:first + count`` (the graph's W rows,
        moved back from the canvas' end where they would pass it), or None when the
        backend has no rows graph or the span is wider than its W."""
        spec = self.graphs.get("rows")
        if spec is None or count > spec.queries:
            return None
        start = min(first, self.seq_len - spec.queries)
        return np.arange(start, start + spec.queries, dtype=np.int64)

    def _run_rows(self, input_ids, attention_mask, head_rows) -> Prediction:
        raise NotImplementedError

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        input_ids, attention_mask, rows = self._padded(input_ids, attention_mask)
        return self._run_logits(input_ids, attention_mask)[:rows]

    # --------------------------------------------------------------- cached graphs

    has_cached_graphs: bool = False

    def _no_cache(self):
        raise DllmExportError(
            f"the {self.name} backend has no cached graphs; export the artifact with --cache")

    def reset_cache(self, batch: int, capacity: int) -> None:
        """Start an empty cache for ``batch`` rows of ``capacity`` slots."""
        self._no_cache()

    graphs: dict = {}  # cached graph name -> contract.GraphSpec (fixed-shape backends)

    def rows_for(self, needed: int) -> int:
        """Query rows of the cached graph that fits ``needed`` queries (fixed shapes pad)."""
        fits = sorted(s.queries for s in self.graphs.values() if s.capacity and s.queries >= needed)
        if not fits:
            if not self.graphs:
                self._no_cache()
            have = sorted(s.queries for s in self.graphs.values() if s.capacity)
            raise DllmExportError(
                f"{getattr(self, 'directory', self.name)}: a cached call needs {needed} query "
                f"rows; the cached graphs take {have}: re-export with --cache and a larger "
                "--window (prefix) or --block-length")
        return fits[0]

    def max_rows(self) -> int | None:
        """The most query rows one cached call takes (None: any number)."""
        rows = [s.queries for s in self.graphs.values() if s.capacity]
        if not rows:
            self._no_cache()
        return max(rows)

    def _graph_for(self, rows: int) -> str:
        """The cached graph (with past inputs) of exactly ``rows`` query rows."""
        for name, spec in self.graphs.items():
            if spec.capacity and spec.queries == rows:
                return name
        raise DllmExportError(f"no cached graph takes {rows} query rows")

    def _check_capacity(self, capacity: int) -> None:
        if not self.graphs:
            self._no_cache()
        if capacity != self.seq_len:
            raise DllmExportError(f"a cache of {capacity} slots; the graphs hold {self.seq_len}")

    def _pad_rows(self, arrays):
        rows = arrays[0].shape[0]
        if self.batch_size is None or rows == self.batch_size:
            return arrays, rows
        extra = self.batch_size - rows
        return [np.concatenate([a, np.repeat(a[:1], extra, axis=0)]) for a in arrays], rows

    def prefill(self, input_ids, position_ids, attention_mask) -> Prediction:
        """A full canvas under ``attention_mask`` [B, L, L]; writes every cache slot."""
        arrays, rows = self._pad_rows([input_ids, position_ids, attention_mask])
        return self._run_prefill(*arrays).rows(rows)

    def cached_step(self, input_ids, position_ids, attention_mask, write=None) -> Prediction:
        """Queries [B, Lq] over ``[cache | themselves]`` (``attention_mask`` [B, Lq, C + Lq]).
        ``write=(first_row, first_slot, count)`` stores those rows' keys and values."""
        arrays, rows = self._pad_rows([input_ids, position_ids, attention_mask])
        return self._run_cached_step(*arrays, write).rows(rows)

    def commit(self, write) -> None:
        """Store rows of the last cached call, decided after it ran (draft-and-verify keeps
        only the drafts that passed): ``write=(first_row, first_slot, count)``."""
        raise DllmExportError(
            f"the {self.name} backend cannot keep rows after a call; draft-and-verify "
            "decoding runs on ONNX Runtime, TensorRT or PyTorch")

    def _run_prefill(self, input_ids, position_ids, attention_mask) -> Prediction:
        self._no_cache()

    def _run_cached_step(self, input_ids, position_ids, attention_mask, write) -> Prediction:
        self._no_cache()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
