"""The checkpoints shipped in ``dllm_export/data`` (docs/default-model.md).

All four were trained on this project's tasks (``eval/tasks.py``), so task accuracy is
their quality measure: calibration draws its states from those tasks for them, and
``profile --quality auto`` scores them.

- ``default-model``: a ZAYA1-architecture MoE trained autoregressively, then converted
  to diffusion by TiDAR-style continued training (``scripts/train_default_model.py``);
  it decodes autoregressively, in blocks over the exact cache, and draft-and-verify.
- ``ar-base``: that model before its conversion (the autoregressive baseline).
- ``llada-moe-tasks``: an earlier masked-diffusion model in the LLaDA-MoE format, the
  shipped model for the masked-diffusion cache modes (``--cache``).
- ``diffusion-gemma-tasks``: a small DiffusionGemma in the published layout, trained on
  the tasks with uniform-noise block diffusion and self-conditioning
  (``scripts/train_diffusion_gemma.py``): what its quantisation and gate are judged on.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = DATA / "default-model"
AR_BASE = DATA / "ar-base"
LLADA_MOE_TASKS = DATA / "llada-moe-tasks"
DIFFUSION_GEMMA_TASKS = DATA / "diffusion-gemma-tasks"
SHIPPED = (DEFAULT_MODEL, AR_BASE, LLADA_MOE_TASKS, DIFFUSION_GEMMA_TASKS)


@lru_cache(maxsize=1)
def _fingerprints() -> frozenset:
    from dllm_export.checkpoint import open_checkpoint

    return frozenset(open_checkpoint(d).fingerprint() for d in SHIPPED
                     if (d / "config.json").is_file())


def trained_on_tasks(fingerprint: str | None = None, checkpoint=None) -> bool:
    """True when a checkpoint directory, or the checkpoint a fingerprint was taken of, is
    one of the shipped task-trained models."""
    if checkpoint is not None and Path(checkpoint).resolve() in {d.resolve() for d in SHIPPED}:
        return True
    return fingerprint is not None and fingerprint in _fingerprints()
