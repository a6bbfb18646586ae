"""``--sweep KEY=V1,V2,...``: what may be swept, and the measurement points it gives.

Each ``--sweep`` is its own series around the baseline settings (several sweeps are not
crossed). Sampler keys change the ``SamplerConfig``; ``seq_len`` changes the canvas (an
artifact per length, exported and cached, or a fixed PyTorch canvas); ``precision`` takes
artifact paths from ``dllm-export quantize`` (or the target's own precision name, and for
PyTorch fp32 / bf16 / fp16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dllm_export.errors import DllmExportError

SAMPLER_KEYS = {
    "threshold": float,
    "block_length": int,
    "steps": int,
    "gen_length": int,
    "cache": str,  # runtime/cache.py MODES: each cache mode beside none
    "tidar_sampler": str,  # runtime/tidar.py SAMPLERS: a draft-and-verify model's modes
}
SWEEP_KEYS = (*SAMPLER_KEYS, "seq_len", "precision")
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Sweep:
    key: str
    values: list


@dataclass
class Point:
    """One measured configuration: the baseline or one value of a sweep."""

    series: str  # "baseline" or the swept key
    value: object
    sampler: dict  # SamplerConfig fields
    path: str  # checkpoint or artifact the job opens
    precision: str
    seq_len: int | None = None  # a fixed canvas (PyTorch)
    notes: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return (
            "baseline" if self.series == "baseline" else f"{self.series}={self.value}"
        )


def parse_sweep(text: str) -> Sweep:
    """``threshold=0.5,0.7`` -> Sweep("threshold", [0.5, 0.7]); one line on bad input."""
    key, sep, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not values.strip():
        raise DllmExportError(
            f"--sweep {text!r}: expected KEY=V1,V2,... (keys: {', '.join(SWEEP_KEYS)})"
        )
    if key not in SWEEP_KEYS:
        raise DllmExportError(
            f"--sweep {text!r}: unknown key {key!r} (keys: {', '.join(SWEEP_KEYS)})"
        )
    items = [v.strip() for v in values.split(",") if v.strip()]
    kind = SAMPLER_KEYS.get(key, int if key == "seq_len" else str)
    try:
        parsed = [kind(v) for v in items]
    except ValueError:
        raise DllmExportError(
            f"--sweep {text!r}: every {key} value must be "
            f"{'a number' if kind is float else 'an integer'}"
        ) from None
    if key in ("threshold",) and any(not 0 < v <= 1 for v in parsed):
        raise DllmExportError(f"--sweep {text!r}: thresholds must lie in (0, 1]")
    if key == "cache":
        from dllm_export.runtime.cache import MODES

        unknown = [v for v in parsed if v not in MODES]
        if unknown:
            raise DllmExportError(
                f"--sweep {text!r}: cache modes are {', '.join(MODES)} (not {unknown[0]!r})")
    if key == "tidar_sampler":
        from dllm_export.runtime.tidar import SAMPLERS

        unknown = [v for v in parsed if v not in SAMPLERS]
        if unknown:
            raise DllmExportError(
                f"--sweep {text!r}: TiDAR samplers are {', '.join(SAMPLERS)} "
                f"(not {unknown[0]!r})")
    if kind is int and any(v < 1 for v in parsed):
        raise DllmExportError(f"--sweep {text!r}: {key} values must be at least 1")
    return Sweep(key, parsed)


def _config(base, overrides: dict, where: str):
    """Build and check a SamplerConfig now, so a bad combination fails before measuring."""
    try:
        return base.updated(**overrides)
    except DllmExportError as err:
        raise DllmExportError(f"{where}: {err}") from None


def sampler_point(base, target_path, precision, sweep: Sweep, value) -> Point:
    overrides = {sweep.key: value}
    if sweep.key == "gen_length" and base.block_length and value % base.block_length:
        overrides["block_length"] = value  # keep one block rather than refuse the point
    config = _config(base, overrides, f"--sweep {sweep.key}={value}")
    return Point(sweep.key, value, asdict(config), str(target_path), precision)


def fit_to_length(config, seq_len: int):
    """A canvas of ``seq_len`` holds at least as many prompt as answer positions."""
    from dllm_export.export.onnx import fit_generation_defaults

    return fit_generation_defaults(config, seq_len)


def precision_point(target, base, value: str) -> Point:
    """A precision value: an artifact directory, the target's own precision, or a PyTorch
    dtype."""
    path = Path(value)
    if (path / "manifest.json").is_file():
        from dllm_export.jsonio import read_json

        manifest = read_json(path / "manifest.json")
        if manifest.get("kind") != "onnx" or target.backend != "onnxruntime":
            raise DllmExportError(
                f"--sweep precision={value}: artifact paths go with an "
                "ONNX Runtime target (ONNX artifacts only)"
            )
        source = (manifest.get("source") or {}).get("fingerprint")
        if target.fingerprint and source != target.fingerprint:
            raise DllmExportError(
                f"--sweep precision={value}: exported from another "
                "checkpoint than the target"
            )
        return Point(
            "precision",
            manifest.get("precision", "fp32"),
            asdict(base),
            str(path),
            manifest.get("precision", "fp32"),
        )
    if value == target.precision:
        return Point("precision", value, asdict(base), str(target.path), value)
    if target.backend == "torch" and value in TORCH_PRECISIONS:
        return Point("precision", value, asdict(base), str(target.path), value)
    raise DllmExportError(
        f"--sweep precision={value}: pass the artifact directory that dllm-export quantize "
        f"wrote (e.g. --sweep precision={target.precision},out/model-{value}); PyTorch runs "
        f"{', '.join(TORCH_PRECISIONS)}"
    )


def build_points(target, base, sweeps: list[Sweep]) -> list[Point]:
    """The baseline followed by each sweep's points (artifact paths filled in later for
    ``seq_len`` on ONNX Runtime)."""
    points = [Point("baseline", None, asdict(base), str(target.path), target.precision)]
    for sweep in sweeps:
        for value in sweep.values:
            if sweep.key in SAMPLER_KEYS:
                points.append(
                    sampler_point(base, target.path, target.precision, sweep, value)
                )
            elif sweep.key == "precision":
                points.append(precision_point(target, base, value))
            else:
                points.append(length_point(target, base, value))
    return points


def length_point(target, base, seq_len: int) -> Point:
    if target.backend == "tensorrt":
        raise DllmExportError(
            "--sweep seq_len on TensorRT: build an engine per length and "
            "profile each engine directory (then --compare the reports)"
        )
    if seq_len < 4:
        raise DllmExportError(
            f"--sweep seq_len={seq_len}: too short for a prompt and an answer"
        )
    config = fit_to_length(base, seq_len)
    point = Point(
        "seq_len",
        seq_len,
        asdict(config),
        str(target.path),
        target.precision,
        seq_len=seq_len,
    )
    if config.gen_length != base.gen_length:
        point.notes.append(
            f"gen_length {base.gen_length} -> {config.gen_length} to leave "
            "room for the prompt"
        )
    return point
