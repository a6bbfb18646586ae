"""TensorRT's builder, driven through its documented Python API: TensorRT 10.8 to 11.x
(11.x networks are always strongly typed and have no FP16/BF16 flags; ``tensorrt_rtx``
exposes the same calls and is strongly typed too).

One fixed-shape optimisation profile (min = opt = max = the artifact's shapes), the device
profile's workspace limit and optimisation level, a timing cache kept per GPU and TensorRT
version, and progress reported through ``IProgressMonitor``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dllm_export.errors import DllmExportError
from dllm_export.precision import FLOAT_PRECISIONS

SUPPORTED = ((10, 8), (11, 99))  # (major, minor) range of TensorRT this builder is written for


@dataclass(frozen=True)
class NetworkTyping:
    """How precision reaches TensorRT: from the graph's own types (strongly typed), from a
    builder flag that lets TensorRT 10 lower an fp32 graph ("FP16" / "BF16"), or from a
    cast copy of the fp32 graph (``cast_to``) where the library is strongly typed only.
    ``creation_flag``: set ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (TensorRT 10; in
    11.x and TensorRT for RTX it is deprecated and ignored, networks always being typed)."""

    strongly_typed: bool
    precision_flag: str | None = None
    cast_to: str | None = None
    creation_flag: bool = False

    def describe(self, precision: str, artifact_dtype: str) -> str:
        """Which of the three it is, in words (printed by build, kept in the manifest)."""
        if self.precision_flag:
            return f"builder flag {self.precision_flag} on the {artifact_dtype} graph"
        if self.cast_to:
            return (f"cast pass {artifact_dtype} -> {self.cast_to} (fp32 kept for norms, "
                    "softmax, router, decode head)")
        return f"graph ({artifact_dtype} artifact built as {precision})"


def tensorrt_major(tensorrt_version: str) -> int:
    return int(str(tensorrt_version).split(".")[0])


def check_supported(tensorrt_version: str, library: str) -> None:
    """Refuse a TensorRT release outside 10.8 - 11.x in one line (TensorRT for RTX: any)."""
    if library != "tensorrt":
        return
    parts = [int(p) for p in re.findall(r"\d+", str(tensorrt_version))[:2]] + [0]
    if not SUPPORTED[0] <= (parts[0], parts[1]) <= SUPPORTED[1]:
        raise DllmExportError(
            f"TensorRT {tensorrt_version} is outside the supported 10.8 to 11.x: install "
            "one of those (pip install 'tensorrt-cu12>=10.8,<12')")


def network_typing(precision: str, artifact_dtype: str, tensorrt_version: str,
                   library: str) -> NetworkTyping:
    """Choose strong typing, a precision flag or a cast pass for this artifact and TensorRT.

    Q/DQ artifacts (int8, fp8, int4, fp4) and graphs already in the engine's float type are
    strongly typed. An fp32 graph built in fp16/bf16 uses TensorRT 10's weak typing (the
    flag); TensorRT 11 and TensorRT for RTX removed the flags, so there the graph is cast
    (``trt_cast.cast_graph``). A 16-bit graph is not recast to the other 16-bit type.
    """
    always_typed = library != "tensorrt" or tensorrt_major(tensorrt_version) >= 11
    if precision not in FLOAT_PRECISIONS or precision == artifact_dtype:
        return NetworkTyping(strongly_typed=True, creation_flag=not always_typed)
    if artifact_dtype == "fp32" and precision in ("fp16", "bf16"):
        if not always_typed:
            return NetworkTyping(strongly_typed=False, precision_flag=precision.upper())
        return NetworkTyping(strongly_typed=True, cast_to=precision)
    raise DllmExportError(
        f"this artifact is {artifact_dtype} and {library} {tensorrt_version} builds the types "
        f"the graph carries: export it again with --dtype {precision} (or from fp32), or build "
        f"it as {artifact_dtype} with --precision {artifact_dtype}")


def timing_cache_path(gpu_name: str, compute_capability: str, tensorrt_version: str,
                      root: Path | None = None) -> Path:
    """``~/.cache/dllm-export/timing/<gpu>-sm<cc>-trt<version>.cache``: tactic timings are
    only valid for the GPU model and TensorRT version that measured them."""
    if root is None:
        base = os.environ.get("DLLM_EXPORT_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dllm-export")
        root = Path(base) / "timing"
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    sm = compute_capability.replace(".", "")
    return Path(root) / f"{gpu}-sm{sm}-trt{tensorrt_version}.cache"


@dataclass(frozen=True)
class BuilderSettings:
    onnx_path: Path
    input_shapes: dict  # tensor name -> fixed shape
    typing: NetworkTyping
    workspace_bytes: int
    optimization_level: int
    timing_cache: Path | None
    weight_streaming: bool = False
    refittable: bool = False


def progress_monitor(trt, report):
    """An ``IProgressMonitor`` that forwards phases and steps to ``report(event, phase,
    parent, count)``; None when this TensorRT has no progress monitor (before 10.0)."""
    if report is None or not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            report("start", phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            report("step", phase_name, None, step)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            report("finish", phase_name, None, 0)

    return Monitor()


def _parse(trt, builder, settings: BuilderSettings, logger):
    flags = 0
    if settings.typing.creation_flag:  # TensorRT 10; 11.x is always strongly typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # From the file path, so that the parser finds the external weight file beside it.
    if not parser.parse_from_file(str(settings.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0] if errors else "no error reported"
        raise DllmExportError(f"{settings.onnx_path}: TensorRT's ONNX parser failed "
                              f"({len(errors)} error(s); first: {first}); run dllm-export "
                              "check-trt on the artifact")
    return network, parser


def _configure(trt, builder, network, settings: BuilderSettings):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = settings.optimization_level
    if settings.typing.precision_flag:
        flag = getattr(trt.BuilderFlag, settings.typing.precision_flag, None)
        if flag is None:  # TensorRT 11 removed the precision flags
            raise DllmExportError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{settings.typing.precision_flag}"
                "; its networks take their precision from the graph (build casts it)")
        config.set_flag(flag)
    if settings.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if settings.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    shapes = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if tensor.name not in settings.input_shapes:
            raise DllmExportError(f"{settings.onnx_path}: graph input {tensor.name!r} is not "
                                  "in the manifest's inputs")
        fixed = tuple(settings.input_shapes[tensor.name])
        shapes.set_shape(tensor.name, fixed, fixed, fixed)
    config.add_optimization_profile(shapes)
    return config


def _load_timing_cache(config, path: Path | None):
    if path is None or not hasattr(config, "create_timing_cache"):
        return None
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config, path: Path | None) -> None:
    if path is None or not hasattr(config, "get_timing_cache"):
        return
    cache = config.get_timing_cache()
    if cache is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(memoryview(cache.serialize()))
    os.replace(tmp, path)  # concurrent builds each leave a whole cache file


def build_serialized(trt, settings: BuilderSettings, report=None) -> memoryview:
    """Parse the ONNX graph and build a serialized engine (``build_serialized_network``).

    Args:
        trt: the imported ``tensorrt`` or ``tensorrt_rtx`` module.
        settings: what to build and how.
        report: optional ``report(event, phase, parent, count)`` for progress.
    Returns:
        The serialized engine, as a view of TensorRT's buffer (no copy of a multi-GB plan).
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, settings, logger)
    config = _configure(trt, builder, network, settings)
    _load_timing_cache(config, settings.timing_cache)
    monitor = progress_monitor(trt, report)
    if monitor is not None:
        config.progress_monitor = monitor  # must outlive the build: kept in this frame
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DllmExportError(f"{settings.onnx_path}: TensorRT could not build an engine (see "
                              "its log above); try a smaller workspace or --precision")
    _save_timing_cache(config, settings.timing_cache)
    return memoryview(serialized)
