"""One weights file for every graph of an artifact.

Each graph is traced and saved on its own (``step.onnx`` + ``step.onnx.data``); then its
external tensors are pointed into the artifact's ``model.onnx.data`` wherever that file
already holds the same bytes (the same parameter, whatever the exporter named it), and
only tensors found nowhere else are appended. The graph's own data file is removed. An
artifact with four cached graphs is then no larger on disk than with one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ALIGN = 4096  # appended tensors start on a page, so a memory map can share them


def _external(tensor) -> dict | None:
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(tensor):
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


class WeightsFile:
    """The shared data file and a digest index of the tensors it holds."""

    def __init__(self, graph_path: Path):
        import onnx

        self.directory = Path(graph_path).parent
        model = onnx.load(str(graph_path), load_external_data=False)
        self.location = None
        self.by_digest: dict[tuple, tuple[int, int]] = {}
        for tensor in model.graph.initializer:
            info = _external(tensor)
            if info is None:
                continue
            self.location = self.location or info["location"]
            offset, length = int(info.get("offset", 0)), int(info["length"])
            data = _read(self.directory / info["location"], offset, length)
            self.by_digest[(tensor.data_type, hashlib.sha256(data).digest())] = (offset, length)
        if self.location is None:
            raise ValueError(f"{graph_path}: no external tensors to share")
        self.path = self.directory / self.location

    def adopt(self, graph_path: Path) -> dict:
        """Point ``graph_path``'s external tensors into the shared file; returns counts."""
        import onnx

        graph_path = Path(graph_path)
        model = onnx.load(str(graph_path), load_external_data=False)
        own_files = set()
        shared = appended = 0
        with open(self.path, "ab") as out:
            for tensor in model.graph.initializer:
                info = _external(tensor)
                if info is None:
                    continue
                own_files.add(info["location"])
                offset, length = int(info.get("offset", 0)), int(info["length"])
                data = _read(graph_path.parent / info["location"], offset, length)
                key = (tensor.data_type, hashlib.sha256(data).digest())
                if key not in self.by_digest:
                    end = out.seek(0, os.SEEK_END)
                    start = -(-end // ALIGN) * ALIGN
                    out.write(b"\0" * (start - end))
                    out.write(data)
                    self.by_digest[key] = (start, length)
                    appended += 1
                else:
                    shared += 1
                _set_external(tensor, self.location, *self.by_digest[key])
        onnx.save(model, str(graph_path))
        for name in own_files - {self.location}:
            (graph_path.parent / name).unlink()
        return {"shared": shared, "appended": appended}
