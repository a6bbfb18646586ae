"""``build``: a validated ONNX artifact in, a TensorRT engine directory for one device out.

Order of checks, cheapest first, so that a build that cannot succeed stops before
TensorRT is even imported: the artifact's manifest, the precision rules of the device
profile, the memory plan (refused with its numbers when it does not fit), then TensorRT and
the GPU (the GPU must be the profile's: engines do not move between GPUs).

The engine directory (written atomically) holds ``model.engine``, the tokenizer files and a
manifest: the artifact's runtime fields plus ``kind: "tensorrt"``, the engine file, the
TensorRT and CUDA versions, the GPU name and compute capability, the profile, the precision
and the source artifact's fingerprint. An artifact with cached graphs gets one engine per
cached graph too (``prefill.engine``, ``step.engine``, ...; ``--no-cache`` leaves them
out). Each engine holds its own copy of the weights, which the memory check counts. ``--via ort-trt`` writes instead an ONNX Runtime
directory whose TensorRT execution provider engine cache is already filled.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from dllm_export.device_profiles import DeviceProfile
from dllm_export.errors import DllmExportError
from dllm_export.export.plan import plan_model
from dllm_export.integrity import record_files
from dllm_export.jsonio import atomic_directory, check_output, write_json
from dllm_export.precision import format_capability
from dllm_export.runtime.artifact import read_manifest
from dllm_export.runtime.tokenizer import copy_tokenizer_files

ENGINE_FILE = "model.engine"
VIA = ("tensorrt", "ort-trt")
# What the runtime needs from an artifact's manifest; the rest describes the ONNX graph.
RUNTIME_FIELDS = (
    "format", "format_version", "family", "source", "shapes", "dtype", "vocab_size",
    "tokenizer_vocab_size", "special_tokens", "special_ids", "topk", "outputs",
    "shift_logits", "moe", "inputs", "output_specs", "generation_defaults", "quantization",
    "contract_version", "cache",
)


@dataclass(frozen=True)
class BuildOptions:
    precision: str | None = None
    via: str = "tensorrt"
    weight_streaming: bool = False
    refittable: bool = False
    timing_cache: Path | None = None  # default: per GPU and TensorRT version under ~/.cache
    overwrite: bool = False
    cache: bool = True  # also the cached graphs' engines, when the artifact has them


def read_artifact(artifact_dir: Path) -> dict:
    manifest = read_manifest(artifact_dir, "build")
    if manifest.get("kind") != "onnx":
        raise DllmExportError(f"{artifact_dir}: kind {manifest.get('kind')!r}; build takes an "
                              "ONNX artifact from dllm-export export or quantize")
    graph = Path(artifact_dir) / manifest["graph"]["file"]
    if not graph.is_file():
        raise DllmExportError(f"{graph}: graph file named in manifest.json is missing")
    return manifest


def check_tensorrt_compatible(artifact_dir: Path, manifest: dict) -> None:
    """Refuse, before TensorRT loads, a graph that check-trt found TensorRT cannot parse
    (for example the ONNX Runtime MoE contrib op of ``--moe ort`` exports)."""
    lint = manifest.get("trt_compatibility") or {}
    errors = [f for f in lint.get("findings", []) if f["severity"] == "error"]
    if not errors:
        return
    first = errors[0]
    fix = ("re-export with --target tensorrt (or --moe dense / sparse)"
           if "com.microsoft" in first["op"]
           else "see dllm-export check-trt")
    raise DllmExportError(
        f"{artifact_dir}: {len(errors)} node(s) TensorRT cannot parse, e.g. {first['node']} "
        f"({first['op']}: {first['reason']}); {fix}")


def artifact_fingerprint(artifact_dir: Path, manifest: dict) -> str:
    """sha256 over the manifest and each graph file's name, size, first and last MiB."""
    digest = hashlib.sha256((Path(artifact_dir) / "manifest.json").read_bytes())
    graph = manifest["graph"]
    for name in (graph.get("file"), graph.get("data")):
        path = Path(artifact_dir) / name if name else None
        if path is None or not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{name}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def check_fit(plan, weight_streaming: bool, engines: int = 1) -> dict:
    """Refuse a plan that does not fit, with its numbers; returns build notes (the weight
    streaming budget when weights may stay partly in host memory). ``engines`` engines each
    hold the weights (the canvas engine and one per cached graph)."""
    memory, profile = plan.chosen, plan.profile
    gib = 1 << 30
    extra = (engines - 1) * memory.weight_bytes
    if memory.total_bytes + extra <= memory.usable_bytes:
        return {}
    if engines > 1 and memory.fits:
        raise DllmExportError(
            f"{plan.source.path}: the canvas engine and {engines - 1} cached engines each "
            f"hold the weights ({engines} x {memory.weight_bytes / gib:.2f} GiB), more than "
            f"the {memory.usable_bytes / gib:.2f} GiB usable on {profile.name}; build with "
            "--no-cache (no cached decoding on TensorRT) or quantise further")
    rest = memory.activation_bytes + memory.workspace_bytes
    if weight_streaming and not profile.unified_memory and rest < memory.usable_bytes:
        return {"weight_streaming_budget_bytes": memory.usable_bytes - rest}
    hint = "; ".join(plan.suggestions[:3])
    raise DllmExportError(
        f"{plan.source.path} does not fit {profile.name} in {memory.precision}: needs "
        f"{memory.total_bytes / gib:.2f} GiB (weights {memory.weight_bytes / gib:.2f}, "
        f"activations {memory.activation_bytes / gib:.2f}, workspace "
        f"{memory.workspace_bytes / gib:.2f}) of {memory.usable_bytes / gib:.2f} GiB usable"
        + (f"; {hint}" if hint else ""))


def check_gpu_matches(profile: DeviceProfile, capability: str, gpu_name: str) -> None:
    """Engines run only on the GPU model they were built on: build on the target."""
    wanted = format_capability(profile.compute_capability)
    if capability != wanted:
        raise DllmExportError(
            f"this GPU ({gpu_name}) has compute capability {capability}, but profile "
            f"{profile.name} describes {wanted}; engines run only where they were built: "
            "build on the target device, or pick the profile of this GPU")


def engine_manifest(artifact_manifest: dict, *, library: str, trt_version: str, gpu,
                    profile: DeviceProfile, precision: str, source: dict, build: dict) -> dict:
    """The engine directory's manifest (see docs/architecture.md)."""
    manifest = {key: copy.deepcopy(artifact_manifest[key]) for key in RUNTIME_FIELDS
                if key in artifact_manifest}
    versions = dict(artifact_manifest.get("versions") or {})
    versions.update({library: trt_version, "cuda": gpu.cuda_runtime})
    manifest.update({
        "kind": "tensorrt",
        "engine": ENGINE_FILE,
        "engine_library": library,
        "tensorrt_version": trt_version,
        "cuda_version": gpu.cuda_runtime,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "profile": profile.name,
        "precision": precision,
        "source_artifact": source,
        "build": build,
        "versions": versions,
        "valid": True,
    })
    return manifest


def peak_host_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def build_engine(artifact_dir, profile: DeviceProfile, out_dir, options: BuildOptions,
                 report=None) -> dict:
    """Build an engine for ``profile`` from an ONNX artifact into ``out_dir``.

    Args:
        artifact_dir: an artifact from ``export`` or ``quantize`` (``valid: true``).
        profile: the target device (this machine's GPU must match it).
        out_dir: the engine directory to write (atomically).
        options: precision, ``via`` ("tensorrt" or "ort-trt"), weight streaming, refit.
        report: optional progress callback ``report(event, phase, parent, count)``.
    Returns:
        The written manifest.
    """
    artifact_dir = Path(artifact_dir)
    check_output(out_dir, (artifact_dir,), options.overwrite)  # before TensorRT loads
    if options.via not in VIA:
        raise DllmExportError(f"--via {options.via!r}: choose one of {', '.join(VIA)}")
    if profile.engine_library == "onnxruntime":
        raise DllmExportError(f"profile {profile.name} runs ONNX Runtime, which needs no "
                              f"engine: run the artifact directly (dllm-export run {artifact_dir})")
    manifest = read_artifact(artifact_dir)
    if not options.cache:
        rule = (manifest.get("cache") or {}).get("attention", "bidirectional")
        if rule != "bidirectional":
            raise DllmExportError(
                f"--no-cache: {manifest['family']} attends {rule.replace('_', '-')}, which "
                "only the cached graphs' engines compute; drop --no-cache")
        manifest = {**manifest, "cache": None}
    plan = plan_model(artifact_dir, profile, precision=options.precision)
    graphs = (manifest.get("cache") or {}).get("graphs") or {}
    notes = check_fit(plan, options.weight_streaming, 1 + len(graphs))
    if options.via == "ort-trt":
        from dllm_export.export.build_ort_trt import build_ort_trt

        return build_ort_trt(artifact_dir, manifest, plan, Path(out_dir), options)
    check_tensorrt_compatible(artifact_dir, manifest)  # ONNX Runtime falls back; TensorRT can't
    return _build_tensorrt(artifact_dir, manifest, plan, Path(out_dir), options, notes, report)


def _build_tensorrt(artifact_dir, manifest, plan, out_dir, options, notes, report) -> dict:
    from dllm_export.export.trt_builder import check_supported, network_typing
    from dllm_export.runtime import cuda
    from dllm_export.runtime.backends.tensorrt import import_engine_library

    profile, precision = plan.profile, plan.chosen.precision
    trt = import_engine_library(profile.engine_library)
    check_supported(trt.__version__, profile.engine_library)
    gpu = cuda.gpu_info()
    check_gpu_matches(profile, gpu.compute_capability, gpu.name)
    artifact_dtype = manifest.get("dtype", "fp32")
    typing = network_typing(precision, artifact_dtype, trt.__version__,
                            profile.engine_library)
    if options.weight_streaming and not typing.strongly_typed:
        raise DllmExportError("--weight-streaming needs a strongly typed network: export the "
                              f"artifact with --dtype {precision} first")
    with typed_graphs(artifact_dir, manifest, typing, out_dir) as (graphs, cast):
        target = _Target(trt, gpu, typing, graphs, cast)
        return _build_typed(artifact_dir, manifest, plan, out_dir, options, notes, report,
                            target)


@dataclass(frozen=True)
class _Target:
    """What the TensorRT build runs with: the library, this GPU, the typing, the graph
    files to parse (the artifact's or cast copies) and what the cast pass did."""

    trt: object
    gpu: object
    typing: object
    graphs: dict
    cast: dict | None


@contextmanager
def typed_graphs(artifact_dir: Path, manifest: dict, typing, out_dir: Path):
    """The graph files TensorRT parses: the artifact's own or, for a cast pass, cast copies in
    a scratch folder beside ``out_dir`` (removed after the build). Yields (graph key ->
    path, what the cast pass did or None); the keys are "model" and the cached graphs'."""
    files = {"model": manifest["graph"]["file"]}
    for name, spec in ((manifest.get("cache") or {}).get("graphs") or {}).items():
        files[name] = spec["file"]
    if typing.cast_to is None:
        yield {key: artifact_dir / name for key, name in files.items()}, None
        return
    from dllm_export.export.trt_cast import cast_graph

    parent = Path(out_dir).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".dllm-cast-", dir=parent))
    try:
        paths, done = {}, None
        for key, name in files.items():
            paths[key] = scratch / Path(name).name
            done = cast_graph(artifact_dir / name, paths[key], typing.cast_to)
        yield paths, done
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _typing_notes(target: _Target, precision: str, artifact_dtype: str) -> dict:
    typing = target.typing
    return {"strongly_typed": typing.strongly_typed, "precision_flag": typing.precision_flag,
            "precision_from": typing.describe(precision, artifact_dtype),
            "cast_pass": target.cast}


def _build_typed(artifact_dir, manifest, plan, out_dir, options, notes, report,
                 target: _Target) -> dict:
    from dllm_export.export.trt_builder import (
        BuilderSettings,
        build_serialized,
        timing_cache_path,
    )
    from dllm_export.runtime import cuda

    profile, precision = plan.profile, plan.chosen.precision
    trt, gpu, typing, graphs = target.trt, target.gpu, target.typing, target.graphs
    settings = BuilderSettings(
        onnx_path=graphs["model"],
        input_shapes={spec["name"]: spec["shape"] for spec in manifest["inputs"]},
        typing=typing,
        workspace_bytes=profile.build.workspace_bytes,
        optimization_level=profile.build.optimization_level,
        timing_cache=options.timing_cache or timing_cache_path(
            gpu.name, gpu.compute_capability, trt.__version__),
        weight_streaming=options.weight_streaming,
        refittable=options.refittable,
    )
    started = time.perf_counter()
    cached = {}
    with cuda.DeviceMemoryPeak() as device_peak:
        engine = build_serialized(trt, settings, report)
        for name, spec in ((manifest.get("cache") or {}).get("graphs") or {}).items():
            shapes = {tensor["name"]: tensor["shape"] for tensor in spec["inputs"]}
            cached[name] = build_serialized(trt, dataclasses.replace(
                settings, onnx_path=graphs[name], input_shapes=shapes), report)
    build = {
        "seconds": round(time.perf_counter() - started, 2),
        "peak_host_bytes": peak_host_bytes(),
        "peak_device_bytes": device_peak.peak,
        "engine_bytes": engine.nbytes,
        "cached_engine_bytes": {name: blob.nbytes for name, blob in cached.items()},
        **_typing_notes(target, precision, manifest.get("dtype", "fp32")),
        "workspace_bytes": settings.workspace_bytes,
        "optimization_level": settings.optimization_level,
        "timing_cache": str(settings.timing_cache),
        "weight_streaming": options.weight_streaming,
        "refittable": options.refittable,
        "dllm_export": _version(),
        **notes,
    }
    source = {"path": str(artifact_dir.resolve()),
              "fingerprint": artifact_fingerprint(artifact_dir, manifest)}
    result = engine_manifest(manifest, library=profile.engine_library,
                             trt_version=trt.__version__, gpu=gpu, profile=profile,
                             precision=precision, source=source, build=build)
    for name in cached:
        result["cache"]["graphs"][name]["engine"] = f"{name}.engine"
    with atomic_directory(out_dir, overwrite=options.overwrite, inputs=(artifact_dir,)) as tmp:
        (tmp / ENGINE_FILE).write_bytes(engine)
        for name, blob in cached.items():
            (tmp / f"{name}.engine").write_bytes(blob)
        copy_tokenizer_files(artifact_dir, tmp)
        result["files"] = record_files(tmp)
        write_json(tmp / "manifest.json", result)
    return result


def _version() -> str:
    try:
        return metadata.version("dllm-export")
    except metadata.PackageNotFoundError:
        return "unknown"
