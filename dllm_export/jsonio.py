"""Small, torch-free helpers for reading JSON and writing directories atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from dllm_export.errors import DllmExportError


def read_json(path: Path, what: str = "") -> dict:
    """Read a JSON object, turning a missing or broken file into one clear line."""
    path = Path(path)
    if not path.is_file():
        raise DllmExportError(f"{path}: file not found{' (' + what + ')' if what else ''}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DllmExportError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    if not isinstance(data, dict):
        raise DllmExportError(f"{path}: expected a JSON object at the top level")
    return data


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out_dir`` only on success.

    A crash or Ctrl-C leaves at most a hidden ``.name.partial-*`` directory behind, never a
    directory at ``out_dir`` that looks complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DllmExportError(f"{out_dir}: already exists; choose another path or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
