"""Calibration states for an artifact, and the summary its manifest records.

The built-in set depends on the model: the shipped default model calibrates on its own
training-side task problems (``sources.default_tasks``: never a held-out one, so the gate's
held-out problems stay unseen), any other model on the shipped generic prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dllm_export import families
from dllm_export.calibration import coverage, sources
from dllm_export.calibration.states import CanvasState, calibration_states

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "default-model"


@dataclass
class Calibration:
    states: list[CanvasState]
    summary: dict
    cached: dict = field(default_factory=dict)  # cached graph name -> input feeds


def is_default_model(manifest: dict) -> bool:
    """True when the artifact was exported from the shipped default model."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        return False
    from dllm_export.checkpoint import open_checkpoint

    fingerprint = manifest.get("source", {}).get("fingerprint")
    return (
        fingerprint is not None
        and open_checkpoint(DEFAULT_MODEL_DIR).fingerprint() == fingerprint
    )


def collect(
    artifact_dir: Path,
    manifest: dict,
    backend,
    generator,
    calib,
    samples: int,
    mode: str,
    calibration_top_k: int | None,
    progress=None,
    cached: bool = False,
) -> Calibration:
    """States from ``calib`` (path, source name or None) and their coverage.

    Args:
        artifact_dir: the float artifact.
        manifest: its manifest.
        backend: its ``OrtBackend`` (trajectories run on it).
        generator: a ``runtime.Generator`` over it (tokenizer, special tokens, sampler).
        calib: ``--calib``.
        samples: number of states.
        mode: "mixed", "forward" or "trajectory".
        calibration_top_k: experts per token that receive statistics.
        cached: also record the cached graphs' states (``cached_states.py``).
    """
    progress = progress or (lambda stage, detail="": None)
    builtin = "tasks" if is_default_model(manifest) else "generic"
    name, texts = sources.open_source(calib, builtin)
    progress("calibration", f"{samples} states from {name} ({mode})")
    states = calibration_states(
        backend,
        texts,
        generator.tokenizer,
        generator.defaults,
        generator.special,
        samples,
        mode,
        progress=progress,
        family=families.family(manifest["family"]),
    )
    progress("calibration", "coverage")
    experts = coverage.expert_coverage(
        Path(artifact_dir) / manifest["graph"]["file"],
        manifest,
        states,
        calibration_top_k,
    )
    summary = {
        "source": name,
        "mode": mode,
        "states": len(states),
        "by_origin": {
            o: sum(s.origin == o for s in states) for o in ("forward", "trajectory")
        },
        "mask_ratio_histogram": coverage.mask_ratio_histogram(states),
        "experts": experts,
    }
    graphs = {}
    if cached:
        from dllm_export.calibration.cached_states import cached_graph_states
        from dllm_export.calibration.states import tokenize

        _, texts = sources.open_source(calib, builtin)
        prompts = [e.prompt_ids for e in tokenize(texts, generator.tokenizer, generator.special)]
        graphs = cached_graph_states(backend, generator, prompts[: max(2, samples // 4)],
                                     samples, progress)
        summary["cached_graphs"] = {name: len(feeds) for name, feeds in graphs.items()}
    return Calibration(states, summary, graphs)
