"""Artifacts and engine directories are verified before they run.

When a stage writes a directory it records every file in the manifest (``files``: size, a
fast digest over the size and the first and last MiB, and the full sha256). Opening the
directory checks sizes and fast digests (milliseconds, even for tens of GB);
``dllm-export validate`` checks the full digests. A manifest edited by hand is checked
field by field here, and each backend compares it with its graph's own inputs and
outputs. Every mismatch is one line naming the file or the field.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dllm_export.errors import DllmExportError

CHUNK = 1 << 20
SKIPPED = {"manifest.json", ".dllm-export"}  # written after the record, or the marker


def fast_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(CHUNK))
        if size > CHUNK:
            handle.seek(max(CHUNK, size - CHUNK))
            digest.update(handle.read(CHUNK))
    return digest.hexdigest()


def full_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 * CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def record_files(directory: Path) -> dict:
    """``{name: {"size", "fast", "sha256"}}`` for every file at the top of ``directory``."""
    directory = Path(directory)
    return {path.name: {"size": path.stat().st_size, "fast": fast_digest(path),
                        "sha256": full_digest(path)}
            for path in sorted(directory.iterdir())
            if path.is_file() and path.name not in SKIPPED}


def verify_files(directory: Path, manifest: dict, full: bool = False) -> None:
    """Refuse, in one line, a file that is missing or differs from the manifest's record
    (sizes and fast digests; every byte with ``full``). Manifests from before the record
    carry no ``files`` and pass."""
    directory = Path(directory)
    for name, record in (manifest.get("files") or {}).items():
        path = directory / name
        if not path.is_file():
            raise DllmExportError(f"{path}: missing; the manifest lists it: copy the whole "
                                  "directory again or re-create it")
        changed = path.stat().st_size != record.get("size") or fast_digest(path) != record.get("fast")
        if not changed and full:
            changed = full_digest(path) != record.get("sha256")
        if changed:
            raise DllmExportError(
                f"{path}: differs from the file this directory was written with (size or "
                "sha256); it was replaced or damaged: re-create the directory")


def _int(manifest: dict, keys: tuple, origin: str, low: int = 0, high: int | None = None):
    value = manifest
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    name = ".".join(keys)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
            high is not None and value >= high):
        bound = f" below {high}" if high is not None else ""
        raise DllmExportError(
            f"{origin}: field {name} = {value!r} must be an integer of at least {low}{bound}")
    return value


def check_manifest(manifest: dict, origin: str) -> None:
    """The fields every runtime reads, with their types and ranges (one line each)."""
    from dllm_export import families

    if manifest.get("family") not in families.NAMES:
        raise DllmExportError(f"{origin}: field family = {manifest.get('family')!r} is not one "
                              f"of {', '.join(families.NAMES)}")
    if not isinstance(manifest.get("shapes"), dict):
        raise DllmExportError(f"{origin}: field shapes is missing; re-export the artifact")
    _int(manifest, ("shapes", "batch"), origin, 1)
    _int(manifest, ("shapes", "seq_len"), origin, 2)
    vocab = _int(manifest, ("vocab_size",), origin, 1)
    _int(manifest, ("topk",), origin, 2, vocab + 1)
    special = manifest.get("special_tokens")
    if not isinstance(special, dict):
        raise DllmExportError(f"{origin}: field special_tokens is missing")
    for key in ("mask_id", "eos_id"):
        _int(manifest, ("special_tokens", key), origin, 0, vocab)
    ids = manifest.get("special_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
        raise DllmExportError(f"{origin}: field special_ids = {ids!r} must list token ids "
                              f"below vocab_size {vocab}")
    if not isinstance(manifest.get("generation_defaults"), dict):
        raise DllmExportError(f"{origin}: field generation_defaults is missing")
