"""What ``profile`` was pointed at, and the artifacts it needs made (cached).

A TARGET is a checkpoint (PyTorch), an ONNX artifact (ONNX Runtime) or an engine directory
(TensorRT). ``--backend`` may ask for another backend over the same model: PyTorch over an
artifact's source checkpoint, or ONNX Runtime over an artifact exported from a checkpoint.
Artifacts that profile exports (other sequence lengths, ONNX Runtime from a checkpoint, the
cached graphs that cache modes and the autoregressive baseline run on) live in a cache
folder keyed by the checkpoint's fingerprint; they always carry the cached graphs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from dllm_export.errors import DllmExportError
from dllm_export.jsonio import read_json

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DEFAULT_CACHE = Path("~/.cache/dllm-export/profile").expanduser()


@dataclass
class Target:
    path: Path
    kind: str  # "checkpoint", "onnx" or "tensorrt"
    backend: str
    family: str
    config: dict
    precision: str
    checkpoint: (
        Path | None
    )  # the checkpoint (given, or an artifact's source when present)
    fingerprint: str | None
    manifest: dict = field(default_factory=dict)
    generation_config: dict = field(default_factory=dict)

    @property
    def moe_strategy(self) -> str | None:
        return (self.manifest.get("moe") or {}).get("strategy")

    def describe(self) -> dict:
        shapes = self.manifest.get("shapes") or {}
        return {
            "path": str(self.path),
            "kind": self.kind,
            "backend": self.backend,
            "family": self.family,
            "precision": self.precision,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "fingerprint": self.fingerprint,
            "moe_strategy": self.moe_strategy,
            "seq_len": shapes.get("seq_len"),
            "batch": shapes.get("batch"),
        }


def _kind(path: Path) -> tuple[str, dict]:
    if (path / "manifest.json").is_file():
        manifest = read_json(path / "manifest.json")
        if manifest.get("kind") not in ("onnx", "tensorrt"):
            raise DllmExportError(
                f"{path / 'manifest.json'}: kind {manifest.get('kind')!r} is "
                "neither an ONNX artifact nor a TensorRT engine"
            )
        from dllm_export.runtime.artifact import refuse_own_layout

        refuse_own_layout(manifest, path, "profile")
        return manifest["kind"], manifest
    if (path / "config.json").is_file():
        return "checkpoint", {}
    raise DllmExportError(
        f"{path}: not a checkpoint (config.json), an artifact or an engine "
        "directory (manifest.json)"
    )


def resolve_target(path, backend: str | None = None, dtype: str = "fp32") -> Target:
    """Read TARGET and decide the backend (default: the one its kind runs on)."""
    from dllm_export.checkpoint import open_checkpoint

    path = Path(path)
    if not path.exists():
        raise DllmExportError(
            f"{path}: no such checkpoint, artifact or engine directory"
        )
    kind, manifest = _kind(path)
    backend = (
        backend
        or {"checkpoint": "torch", "onnx": "onnxruntime", "tensorrt": "tensorrt"}[kind]
    )
    if backend not in BACKENDS:
        raise DllmExportError(
            f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}"
        )
    if kind == "checkpoint":
        checkpoint = open_checkpoint(path)
        if backend == "tensorrt":
            raise DllmExportError(
                f"{path}: a checkpoint cannot run on TensorRT; export and "
                "build it first (dllm-export export, then build)"
            )
        return Target(
            path,
            kind,
            backend,
            checkpoint.family,
            checkpoint.config,
            dtype,
            path,
            checkpoint.fingerprint(),
            {},
            checkpoint.generation_config,
        )
    if kind == "tensorrt" and backend != "tensorrt":
        raise DllmExportError(
            f"{path}: an engine directory runs on --backend tensorrt only"
        )
    if kind == "onnx" and backend == "tensorrt":
        raise DllmExportError(
            f"{path}: an ONNX artifact; build an engine from it first "
            "(dllm-export build) and profile the engine directory"
        )
    source = manifest.get("source") or {}
    checkpoint = Path(source["checkpoint"]) if source.get("checkpoint") else None
    if checkpoint is not None and not (checkpoint / "config.json").is_file():
        checkpoint = None
    if backend == "torch" and checkpoint is None:
        raise DllmExportError(
            f"{path}: --backend torch needs the artifact's source checkpoint "
            f"({source.get('checkpoint')}), which is gone; profile the "
            "checkpoint directly"
        )
    if backend == "torch":  # the same model in PyTorch: profile its checkpoint
        same = resolve_target(checkpoint, "torch", dtype)
        if source.get("fingerprint") and same.fingerprint != source["fingerprint"]:
            raise DllmExportError(
                f"{checkpoint}: changed since {path} was exported from it (fingerprint "
                "differs); profile the checkpoint directly"
            )
        return same
    return Target(
        path,
        kind,
        backend,
        manifest["family"],
        source.get("config") or {},
        manifest.get("precision", "fp32"),
        checkpoint,
        source.get("fingerprint"),
        manifest,
    )


def cached_artifact(
    target: Target, seq_len: int, moe: str, cache_dir: Path, report=None
) -> Path:
    """An artifact of the target's checkpoint at ``seq_len`` (exported once, then reused)."""
    from dllm_export.export.onnx import ExportOptions, export_model

    if target.checkpoint is None:
        raise DllmExportError(
            f"{target.path}: exporting another sequence length needs the "
            "source checkpoint, which is not available"
        )
    dtype = target.precision if target.precision in ("fp32", "fp16", "bf16") else "fp32"
    out = cache_dir / f"{target.fingerprint[:16]}-L{seq_len}-{moe}-{dtype}-cached"
    if (out / "manifest.json").is_file():
        manifest = read_json(out / "manifest.json")
        if (
            manifest.get("valid")
            and (manifest.get("source") or {}).get("fingerprint") == target.fingerprint
            and manifest.get("cache")
        ):
            return out
    if report:
        report("export", f"artifact seq_len {seq_len} ({moe} MoE, cached graphs), in {out}")
    options = ExportOptions(seq_len=seq_len, dtype=dtype, moe=moe, overwrite=True, cache=True)
    export_model(target.checkpoint, out, options)
    return out


def with_cached_graphs(target: Target, cache_dir: Path, report=None) -> Path | None:
    """An artifact of ``target`` that has the cached graphs: its own, or one exported from
    its checkpoint at the same canvas and MoE form (None when neither is possible)."""
    if target.manifest.get("cache"):
        return target.path
    if target.checkpoint is None:
        return None
    shapes = target.manifest.get("shapes") or {}
    from dllm_export.export.onnx import DEFAULT_MOE

    return cached_artifact(target, shapes["seq_len"], target.moe_strategy or DEFAULT_MOE,
                           cache_dir, report)


def as_artifact_target(target: Target, artifact: Path) -> Target:
    """The same model, measured through an artifact instead (ONNX Runtime)."""
    _, manifest = _kind(artifact)
    return dataclasses.replace(
        target,
        path=artifact,
        kind="onnx",
        backend="onnxruntime",
        manifest=manifest,
        precision=manifest.get("precision", "fp32"),
    )


def is_task_model(target: Target) -> bool:
    """Quality is defined on the shipped models trained on eval/tasks.py
    (``dllm_export/shipped.py``)."""
    from dllm_export.shipped import trained_on_tasks

    return target.checkpoint is not None and trained_on_tasks(target.fingerprint,
                                                              target.checkpoint)
