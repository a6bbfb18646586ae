"""A model under evaluation: a checkpoint (PyTorch) or an artifact (ONNX Runtime), with
the three things the harness asks of it: top-1 predictions, full logits, and generation.

Both kinds run on canvases built here, so two models compared see identical inputs:
``common_shape`` picks the canvas length and batch that fit both (an artifact's are fixed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.runtime.api import Generator
from dllm_export.runtime.generate import SamplerConfig

DEFAULT_BATCH = 16  # rows per forward where the backend takes any batch (PyTorch)


class FixedLength:
    """A backend seen through a fixed canvas length, so that PyTorch builds the same
    left-padded canvases as the artifact it is compared with."""

    def __init__(self, backend, seq_len: int):
        self.backend = backend
        self.seq_len = seq_len

    def __getattr__(self, name):
        return getattr(self.backend, name)


@dataclass
class ModelInfo:
    path: str
    kind: str  # "checkpoint", "onnx" or "tensorrt"
    backend: str  # "torch", "onnxruntime", "tensorrt"
    family: str
    seq_len: int | None  # fixed canvas length, or None
    batch: int | None  # fixed batch, or None
    precision: str | None = None


class EvalModel:
    """Wraps a ``Generator``; artifacts open their logits graph only when asked for."""

    def __init__(self, generator: Generator, info: ModelInfo, logits_backend=None):
        self.generator = generator
        self.info = info
        self._logits_backend = logits_backend
        # Rows per forward for scoring; any batch gives the same inputs row by row.
        self.batch = info.batch or DEFAULT_BATCH

    @classmethod
    def open(cls, path, provider: str = "cpu", threads: int | None = None) -> "EvalModel":
        """A checkpoint directory (config.json) or an artifact/engine (manifest.json)."""
        path = Path(path)
        if (path / "manifest.json").is_file():
            from dllm_export.runtime.artifact import read_manifest

            manifest = read_manifest(path, "eval")
            generator = Generator.from_artifact(path, provider=provider, threads=threads)
            return cls(generator, ModelInfo(
                str(path), manifest.get("kind", "onnx"), generator.backend.name,
                manifest["family"], manifest["shapes"]["seq_len"], manifest["shapes"]["batch"],
                manifest.get("precision") or manifest.get("dtype")))
        if (path / "config.json").is_file():
            generator = Generator.from_checkpoint(path)
            return cls(generator, ModelInfo(str(path), "checkpoint", "torch",
                                            generator.family, None, None, "fp32"))
        raise DllmExportError(
            f"{path}: neither a checkpoint (config.json) nor an artifact (manifest.json)")

    @classmethod
    def from_generator(cls, generator: Generator) -> "EvalModel":
        backend = generator.backend
        directory = getattr(generator.tokenizer, "directory", "")
        return cls(generator, ModelInfo(
            str(directory), "checkpoint" if backend.name == "torch" else backend.name,
            backend.name, generator.family, backend.seq_len, backend.batch_size))

    def use_batch(self, requested: int | None) -> None:
        """Rows per scoring forward: ``requested`` (capped by a fixed batch) or the default."""
        fixed = self.info.batch
        self.batch = min(fixed, requested or fixed) if fixed else (requested or DEFAULT_BATCH)

    @property
    def special(self):
        return self.generator.special

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    def top1(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The decode head's most likely token per position, [B, L]."""
        rows = []
        for start in range(0, len(input_ids), self.batch):
            chunk = slice(start, start + self.batch)
            pred = self.generator.backend.predict(input_ids[chunk], attention_mask[chunk])
            rows.append(pred.topk_ids[..., 0])
        return np.concatenate(rows)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Full logits [B, L, V] (float32), batch by batch."""
        backend = self.logits_backend()
        rows = []
        for start in range(0, len(input_ids), self.batch):
            chunk = slice(start, start + self.batch)
            rows.append(backend.logits(input_ids[chunk], attention_mask[chunk]))
        return np.concatenate(rows).astype(np.float32, copy=False)

    def has_logits(self) -> bool:
        try:
            self.logits_backend()
        except DllmExportError:
            return False
        return True

    def logits_backend(self):
        """The generator's own backend where it has logits (PyTorch, logits artifacts),
        else the artifact's logits graph (same weights, one more output)."""
        if self._logits_backend is None:
            backend = self.generator.backend
            if getattr(backend, "name", "") == "onnxruntime" and not backend.has_logits:
                from dllm_export.runtime.artifact import read_manifest
                from dllm_export.runtime.backends.onnxruntime import OrtBackend

                directory = Path(self.info.path)
                backend = OrtBackend(directory, read_manifest(directory),
                                     provider=backend.provider, logits=True)
            elif getattr(backend, "name", "") not in ("torch", "onnxruntime"):
                raise DllmExportError(
                    f"{self.info.path}: the {backend.name} backend has no logits output; "
                    "evaluate the ONNX artifact it was built from for the ELBO")
            self._logits_backend = backend
        return self._logits_backend

    def generator_for(self, config: SamplerConfig, seq_len: int | None) -> Generator:
        """The same model with ``config`` as its defaults (so every option is pinned, not
        only the ones given) and, for PyTorch, the compared artifact's canvas length."""
        generator = self.generator
        backend = generator.backend
        if seq_len is not None and backend.seq_len is None:
            backend = FixedLength(backend, seq_len)
        return Generator(backend, generator.tokenizer, generator.special, config,
                         generator.family)

    def close(self) -> None:
        for backend in {id(b): b for b in (self.generator.backend, self._logits_backend)
                        if b is not None}.values():
            backend.close()


def common_shape(models: list[EvalModel], batch: int | None) -> tuple[int | None, int]:
    """The canvas length and batch every model can run: a fixed length wins over none,
    the smallest fixed batch over the default. Two different fixed lengths cannot see
    identical inputs, so they are refused."""
    lengths = {m.info.seq_len for m in models if m.info.seq_len is not None}
    if len(lengths) > 1:
        shown = " and ".join(f"{m.info.path} ({m.info.seq_len})" for m in models)
        raise DllmExportError(
            f"canvas lengths differ: {shown}; export both with the same --seq-len")
    batches = [m.info.batch for m in models if m.info.batch is not None]
    chosen = min(batches) if batches else (batch or DEFAULT_BATCH)
    if batch is not None:
        chosen = min(chosen, batch)
    return (lengths.pop() if lengths else None), chosen
