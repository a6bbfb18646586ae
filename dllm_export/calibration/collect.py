"""Calibration states for an artifact, and the summary its manifest records.

The built-in set depends on the model: the shipped default model calibrates on its own
training-side task problems (``sources.default_tasks``: never a held-out one, so the gate's
held-out problems stay unseen), any other model on the shipped generic prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from dllm_export import families
from dllm_export.calibration import coverage, sources
from dllm_export.calibration.states import CanvasState, calibration_states


@dataclass
class Calibration:
    states: list[CanvasState]
    summary: dict
    cached: dict = field(default_factory=dict)  # cached graph name -> input feeds


def is_task_model(manifest: dict) -> bool:
    """True when the artifact was exported from a shipped task-trained model
    (``dllm_export/shipped.py``)."""
    from dllm_export.shipped import trained_on_tasks

    return trained_on_tasks(manifest.get("source", {}).get("fingerprint"))


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
    builtin = "tasks" if is_task_model(manifest) else "generic"
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

        _, texts = sources.open_source(calib, builtin)  # the built-in tasks never end
        examples = islice(tokenize(texts, generator.tokenizer, generator.special),
                          max(2, samples // 4))
        graphs = cached_graph_states(backend, generator, [e.prompt_ids for e in examples],
                                     samples, progress)
        summary["cached_graphs"] = {name: len(feeds) for name, feeds in graphs.items()}
    return Calibration(states, summary, graphs)
