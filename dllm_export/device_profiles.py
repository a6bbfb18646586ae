"""Device profiles: hardware facts and build settings as YAML files, one per device.

The shipped files live in the repository's ``profiles/`` folder and are installed with the
wheel under ``<prefix>/share/dllm-export/profiles``. A user's own file is used by passing
its path wherever a profile name is accepted. Code never branches on a device name: what
differs between devices is in these files.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

from dllm_export.errors import DllmExportError
from dllm_export.precision import (
    FLOAT_PRECISIONS,
    PEAK_KEYS,
    PRECISIONS,
    hardware_refusal,
    peak_key,
)

ENGINE_LIBRARIES = ("tensorrt", "tensorrt_rtx", "onnxruntime")
# MatMulNBits' accuracy levels (onnxruntime's contrib op: 0 unset, 1 fp32 .. 4 int8).
NBITS_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
GIB = 1 << 30


@dataclass(frozen=True)
class BuildSettings:
    workspace_gib: float
    optimization_level: int
    seq_len: int
    batch: int
    precision: str

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gib * GIB)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    engine_library: str
    compute_capability: tuple[int, int] | None
    memory_gib: float
    unified_memory: bool
    usable_fraction: float
    bandwidth_gbs: float
    peak_tflops: dict
    precisions: tuple[str, ...]
    dla_cores: int
    build: BuildSettings
    sources: dict
    path: Path
    # MatMulNBits' accuracy_level for INT4/INT8 weight-only artifacts on this device
    # (0: float32 arithmetic, 4: int8); None: ONNX Runtime's int8 default. Measured.
    nbits_accuracy_level: int | None = None

    @property
    def usable_bytes(self) -> int:
        """Memory an engine may use: all of it on a discrete GPU, a share of the unified
        memory that the CPU and the OS also live in on a Jetson."""
        return int(self.memory_gib * GIB * self.usable_fraction)

    def peak_flops(self, precision: str) -> float:
        return self.peak_tflops[peak_key(precision, self.peak_tflops)] * 1e12

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9


def profile_dirs() -> list[Path]:
    """Where the shipped profiles are: the source checkout first, then the install."""
    candidates = [Path(__file__).resolve().parent.parent / "profiles"]
    # pyproject's data-files put them under the install's data path (a venv, or --user).
    for data in (sysconfig.get_path("data"),
                 sysconfig.get_path("data", sysconfig.get_preferred_scheme("user"))):
        candidates.append(Path(data) / "share" / "dllm-export" / "profiles")
    return [path for path in candidates if path.is_dir() and any(path.glob("*.yaml"))]


def builtin_profiles() -> dict[str, Path]:
    """Name -> file of every shipped profile (the first folder wins on duplicates)."""
    found: dict[str, Path] = {}
    for folder in profile_dirs():
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name, or a user's profile file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise DllmExportError(f"{path}: profile file not found")
        return parse_profile(path)
    shipped = builtin_profiles()
    if text not in shipped:
        known = ", ".join(sorted(shipped)) or "none found"
        raise DllmExportError(
            f"--profile {text!r}: no such device profile (shipped: {known}); "
            "or pass the path of your own .yaml file"
        )
    return parse_profile(shipped[text])


def all_profiles() -> list[DeviceProfile]:
    return [parse_profile(path) for path in builtin_profiles().values()]


def parse_profile(path: Path) -> DeviceProfile:
    """Read and check one profile file; a problem gets one line naming file and field."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DllmExportError(f"{path}: not a readable YAML file ({reason})") from None
    if not isinstance(data, dict):
        raise DllmExportError(f"{path}: expected a mapping of fields at the top level")
    return _ProfileReader(path, data).read()


class _ProfileReader:
    """Field-by-field checks; each failure names ``file: field 'a.b'`` and the problem."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    def fail(self, field: str, problem: str):
        raise DllmExportError(f"{self.path}: field '{field}' {problem}")

    def get(self, field: str, kind, required: bool = True):
        value = self.data
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                if required:
                    self.fail(field, "is missing")
                return None
            value = value[part]
        kinds = {float: (int, float), int: (int,), str: (str,), bool: (bool,),
                 dict: (dict,), list: (list,)}[kind]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kinds):
            self.fail(field, f"must be {kind.__name__} (got {value!r})")
        return value

    def positive(self, field: str, kind=float):
        value = self.get(field, kind)
        if value <= 0:
            self.fail(field, f"must be positive (got {value!r})")
        return value

    def capability(self) -> tuple[int, int] | None:
        value = self.data.get("compute_capability")
        if value is None:
            if self.data.get("engine_library") != "onnxruntime":
                self.fail("compute_capability", "is missing (a GPU profile needs it)")
            return None
        major, _, minor = str(value).partition(".")
        if not (major.isdigit() and minor.isdigit()):
            self.fail("compute_capability", f"must look like \"8.7\" (got {value!r})")
        return int(major), int(minor)

    def read(self) -> DeviceProfile:
        library = self.get("engine_library", str)
        if library not in ENGINE_LIBRARIES:
            self.fail("engine_library", f"must be one of {', '.join(ENGINE_LIBRARIES)} "
                      f"(got {library!r})")
        capability = self.capability()
        usable = self.positive("memory.usable_fraction")
        if usable > 1:
            self.fail("memory.usable_fraction", f"must be at most 1 (got {usable})")
        peaks = self.get("peak_tflops", dict)
        for key in peaks:
            if key not in PEAK_KEYS:
                self.fail(f"peak_tflops.{key}", f"is not a known precision "
                          f"({', '.join(PEAK_KEYS)})")
            self.positive(f"peak_tflops.{key}")
        precisions = self.precisions(capability, peaks)
        workspace = self.get("build.workspace_gib", float)
        if workspace < 0:
            self.fail("build.workspace_gib", f"must not be negative (got {workspace})")
        build = BuildSettings(
            workspace_gib=workspace,
            optimization_level=self.get("build.optimization_level", int),
            seq_len=self.positive("build.seq_len", int),
            batch=self.positive("build.batch", int),
            precision=self.get("build.precision", str),
        )
        if not 0 <= build.optimization_level <= 5:
            self.fail("build.optimization_level", "must be 0..5 (TensorRT's range)")
        if build.precision not in FLOAT_PRECISIONS or build.precision not in precisions:
            self.fail("build.precision", f"must be a float precision listed in 'precisions' "
                      f"(it is what fp32 artifacts build in; got {build.precision!r})")
        dla = self.get("dla_cores", int)
        level = self.get("quantization.nbits_accuracy_level", int, required=False)
        if level is not None and level not in NBITS_ACCURACY_LEVELS:
            self.fail("quantization.nbits_accuracy_level",
                      f"must be one of {', '.join(map(str, NBITS_ACCURACY_LEVELS))} "
                      f"(got {level!r})")
        profile = DeviceProfile(
            name=self.get("name", str),
            description=self.get("description", str),
            engine_library=library,
            compute_capability=capability,
            memory_gib=self.positive("memory.total_gib"),
            unified_memory=self.get("memory.unified", bool),
            usable_fraction=usable,
            bandwidth_gbs=self.positive("bandwidth_gbs"),
            peak_tflops=dict(peaks),
            precisions=tuple(precisions),
            dla_cores=dla,
            build=build,
            sources=self.get("sources", dict),
            path=self.path,
            nbits_accuracy_level=level,
        )
        self.check_sources(profile)
        return profile

    def precisions(self, capability, peaks) -> list[str]:
        precisions = self.get("precisions", list)
        if not precisions:
            self.fail("precisions", "is empty")
        for precision in precisions:
            if precision not in PRECISIONS:
                self.fail("precisions", f"lists unknown precision {precision!r} "
                          f"(known: {', '.join(PRECISIONS)})")
            reason = hardware_refusal(precision, capability)
            if reason:
                self.fail("precisions", f"lists {precision}, but {reason}")
            if peak_key(precision, peaks) not in peaks:
                self.fail(f"peak_tflops.{peak_key(precision, peaks)}",
                          f"is missing (needed for precision {precision})")
        return precisions

    def check_sources(self, profile: DeviceProfile):
        """Every hardware number names where it comes from (or says it is derived)."""
        numbers = ["memory.total_gib", "memory.usable_fraction", "bandwidth_gbs", "dla_cores"]
        numbers += [f"peak_tflops.{key}" for key in profile.peak_tflops]
        if profile.compute_capability is not None:
            numbers.append("compute_capability")
        if profile.nbits_accuracy_level is not None:
            numbers.append("quantization.nbits_accuracy_level")
        for field in numbers:
            source = profile.sources.get(field)
            if not isinstance(source, str) or not source.strip():
                self.fail(f"sources.{field}", "is missing: say where the number comes from "
                          "(datasheet name or URL, or 'derived: ...')")
