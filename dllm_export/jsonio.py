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


MARKER = ".dllm-export"  # in every directory dllm-export writes: "this one is ours"
IN_PROGRESS: set[Path] = set()  # partial directories of this process (for signal handlers)


def remove_in_progress() -> None:
    """Remove this process's partial directories (a SIGTERM handler's clean-up)."""
    for path in list(IN_PROGRESS):
        shutil.rmtree(path, ignore_errors=True)
        IN_PROGRESS.discard(path)


def _mark(directory: Path, state: str) -> None:
    (directory / MARKER).write_text(json.dumps({"written_by": "dllm-export", "state": state,
                                                "pid": os.getpid()}) + "\n")


def is_ours(directory: Path) -> bool:
    """A directory dllm-export wrote: it carries the marker, or (older artifacts) a
    manifest or profile report of ours."""
    directory = Path(directory)
    if (directory / MARKER).is_file():
        return True
    for name in ("manifest.json", "profile.json"):  # artifacts, engines; profile reports
        try:
            if json.loads((directory / name).read_text()).get("format", "").startswith(
                    "dllm-export"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _related(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def check_output(out_dir: Path, inputs=(), overwrite: bool = False) -> None:
    """Refuse an output that is, contains or lies inside an input of the command, and an
    existing one unless ``overwrite`` and it is a directory dllm-export wrote."""
    out = Path(out_dir).resolve()
    for source in inputs:
        if source is None:
            continue
        relation = _related(out, Path(source).resolve())
        if relation:
            raise DllmExportError(
                f"{out_dir}: the output {relation} the input {source}; writing it would "
                "destroy what the command reads: choose another output path")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise DllmExportError(f"{out_dir}: already exists; choose another path or pass --overwrite")
    if not out.is_dir():
        raise DllmExportError(
            f"{out_dir}: exists and is not a directory; --overwrite replaces only directories "
            "dllm-export wrote: remove it yourself or choose another path")
    if not is_ours(out) and any(out.iterdir()):  # an empty directory holds nothing to lose
        raise DllmExportError(
            f"{out_dir}: exists and was not written by dllm-export (no {MARKER} marker or "
            "manifest); --overwrite never deletes other directories: choose another path")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove our own leftovers beside ``out_dir`` (a killed run's ``.NAME.partial-*`` or
    ``.NAME.old-*``, marked and with no live process); returns what was removed."""
    out_dir = Path(out_dir)
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for path in out_dir.parent.glob(f".{out_dir.name}.*"):
        if not path.is_dir() or not path.name.startswith(
                (f".{out_dir.name}.partial-", f".{out_dir.name}.old-")):
            continue
        try:
            marker = json.loads((path / MARKER).read_text())
        except (OSError, ValueError):
            continue  # not ours: never touched
        if marker.get("written_by") == "dllm-export" and not _alive(int(marker.get("pid", 0))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _ordinary_permissions(directory: Path) -> None:
    """Files written private (onnx saves external weights 0600) get the permissions the
    user's umask gives any new file, so that a server running as another user reads them."""
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.stat().st_mode & 0o077:
            os.chmod(path, (path.stat().st_mode | 0o666) & ~mask & 0o777)


@contextlib.contextmanager
def atomic_directory(out_dir: Path, overwrite: bool = False, inputs=()) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out_dir`` only on success.

    The output is checked first (``check_output``: never an input, never a directory that is
    not ours). The temporary directory is marked as ours; a crash or Ctrl-C (SIGTERM is
    handled like it by the CLI) removes it, and a SIGKILL's leftover is removed by the next
    run for the same output. The previous output is replaced by renames, its old copy
    removed at once.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, inputs, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    IN_PROGRESS.add(tmp)
    try:
        _mark(tmp, "partial")
        yield tmp
        _ordinary_permissions(tmp)
        _mark(tmp, "complete")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        IN_PROGRESS.discard(tmp)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
