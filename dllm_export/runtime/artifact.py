"""Open a directory made by ``export``/``quantize`` (ONNX) or ``build`` (TensorRT engine)
and return the backend its manifest asks for."""

from __future__ import annotations

from pathlib import Path

from dllm_export.errors import DllmExportError
from dllm_export.jsonio import read_json

KINDS = ("onnx", "tensorrt")


def refuse_own_layout(manifest: dict, path, stage: str) -> None:
    """One line for an artifact whose graphs and manifest are its family's own (DiffusionGemma:
    encoder, decoder and commit graphs, its own sampler), which ``stage`` does not take."""
    if manifest.get("family") == "diffusion-gemma":
        raise DllmExportError(
            f"{path}: a DiffusionGemma artifact (its own graphs and sampler): dllm-export run "
            f"and plan take it, {stage} does not yet (docs/diffusion-gemma.md)")


def read_manifest(directory: Path, stage: str = "this stage") -> dict:
    """The manifest of an artifact or engine directory, refused unless marked valid."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DllmExportError(
            f"{directory}: no manifest.json; point to a directory written by dllm-export "
            "export, quantize or build")
    manifest = read_json(path)
    if manifest.get("format", "dllm-export") != "dllm-export":
        raise DllmExportError(f"{path}: format {manifest.get('format')!r} is not dllm-export")
    refuse_own_layout(manifest, directory, stage)
    if manifest.get("valid") is not True:
        raise DllmExportError(
            f"{path}: not marked valid (\"valid\": true); the stage that wrote it failed its "
            "checks or did not finish: run it again")
    from dllm_export.contract import check_version
    from dllm_export.integrity import check_manifest, verify_files

    check_version(manifest, str(path))
    check_manifest(manifest, str(path))
    verify_files(Path(directory), manifest)
    return manifest


def open_backend(directory: Path, provider: str = "cpu", threads: int | None = None,
                 memory: str = "fast"):
    """The backend for an artifact (ONNX Runtime) or an engine directory (TensorRT).

    Args:
        directory: what ``export``, ``quantize`` or ``build`` wrote.
        provider: ONNX Runtime execution provider for ONNX artifacts ("cpu", ...).
        threads: ONNX Runtime intra-op threads (None: its default).
        memory: ONNX Runtime weights, "fast" (each graph pre-packs its own) or "lean" (one
            shared memory-mapped copy for all graphs, nothing packed).
    Returns:
        (backend, manifest)
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    kind = manifest.get("kind")
    if kind == "tensorrt":
        from dllm_export.runtime.backends.tensorrt import TensorRTBackend

        if memory != "fast":
            raise DllmExportError(f"--memory {memory}: a TensorRT engine holds its own "
                                  "weights; the option is for ONNX artifacts")
        return TensorRTBackend(directory, manifest), manifest
    if kind == "onnx":
        from dllm_export.runtime.backends.onnxruntime import OrtBackend

        return OrtBackend(directory, manifest, provider=provider, threads=threads,
                          memory=memory), manifest
    raise DllmExportError(
        f"{directory / 'manifest.json'}: kind {kind!r} is not one this runtime opens "
        f"({', '.join(KINDS)})")
