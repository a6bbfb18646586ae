"""``profile``: measure a target on its backend, beside the roofline and an autoregressive
baseline, over optional sweeps. Returns one JSON-able dict; ``report.py`` writes it out.

Order of work: resolve the target and the sampler settings, check every sweep point (so a
bad flag fails before anything is measured), export what is missing (cached), then run the
jobs one after another, each in its own process by default (``jobs.run_isolated``).
"""

from __future__ import annotations

import datetime
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dllm_export.errors import DllmExportError
from dllm_export.profiling import analysis
from dllm_export.profiling.jobs import run_isolated, run_job
from dllm_export.profiling.stats import machine_load
from dllm_export.profiling.sweeps import build_points, parse_sweep
from dllm_export.profiling.targets import (
    DEFAULT_CACHE,
    as_artifact_target,
    cached_artifact,
    is_default_model,
    resolve_target,
)

# Prompts in the shape of the default model's tasks (speed only: any text would do).
DEFAULT_PROMPTS = (
    "What is 123 + 456?",
    "Sort: 42 7 19 3 88",
    "Reverse: red cat sun moon",
    "a=37, k=12, x=88. What is x?",
)
QUALITY_MODES = ("auto", "on", "off")


@dataclass
class ProfileOptions:
    profile: str
    backend: str | None = None
    sampler: dict = field(default_factory=dict)  # SamplerConfig overrides
    prompts: list | None = None
    chat: bool = True
    sweeps: list = field(default_factory=list)  # "KEY=V1,V2" strings
    warmup: int = 1
    runs: int = 5
    threads: int | None = None
    device: str = "cpu"  # torch
    provider: str = "cpu"  # onnxruntime
    dtype: str = "fp32"  # torch
    seq_len: int | None = None  # torch: fixed canvas; checkpoint -> ORT: export length
    moe: str | None = None  # MoE strategy of artifacts profile exports
    autoregressive: bool = True
    quality: str = "auto"
    quality_examples: int = 20
    isolate: bool = True
    cache_dir: Path = DEFAULT_CACHE

    def __post_init__(self):
        if self.quality not in QUALITY_MODES:
            raise DllmExportError(f"--quality {self.quality!r}: choose auto, on or off")
        if self.runs < 1 or self.warmup < 0:
            raise DllmExportError("--runs must be at least 1 and --warmup at least 0")
        if self.prompts is not None and not self.prompts:
            raise DllmExportError("--prompts: the file holds no prompts")


def read_prompts(path) -> list[str]:
    """One prompt per line (blank lines skipped), or JSON lines with a "prompt" field."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DllmExportError(f"--prompts {path}: file not found")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DllmExportError(
                    f'{path}:{number}: expected {{"prompt": ...}}'
                ) from None
        else:
            prompts.append(line.strip())
    return prompts


def _base_config(target, overrides: dict):
    from dllm_export.runtime.api import sampler_defaults
    from dllm_export.runtime.generate import SamplerConfig

    if target.kind == "checkpoint":
        base = sampler_defaults(target.family, target.generation_config)
    else:
        base = SamplerConfig(**target.manifest["generation_defaults"])
    return base.updated(**overrides)


def _prepare(options: ProfileOptions, target, sweeps, report):
    """Targets that need an artifact made first, and the points to measure."""
    if target.kind == "checkpoint" and target.backend == "onnxruntime":
        from dllm_export.device_profiles import load_profile

        length = options.seq_len or load_profile(options.profile).build.seq_len
        artifact = cached_artifact(
            target, length, options.moe or "sparse", options.cache_dir, report
        )
        target = as_artifact_target(target, artifact)
    base = _base_config(target, options.sampler)
    points = build_points(target, base, sweeps)
    for point in points:
        if point.series == "baseline" and target.backend == "torch":
            point.seq_len = options.seq_len
        if point.series == "seq_len" and target.backend == "onnxruntime":
            moe = target.moe_strategy or options.moe or "sparse"
            point.path = str(
                cached_artifact(target, point.seq_len, moe, options.cache_dir, report)
            )
            point.seq_len = None  # the artifact fixes the canvas
    return target, base, points


def _job(
    options, target, kind: str, path, precision: str, sampler: dict, **extra
) -> dict:
    return {
        "kind": kind,
        "backend": target.backend,
        "path": str(path),
        "family": target.family,
        "device": options.device,
        "provider": options.provider,
        "threads": options.threads,
        "dtype": precision if target.backend == "torch" else "fp32",
        "sampler": sampler,
        "prompts": list(options.prompts or DEFAULT_PROMPTS),
        "chat": options.chat,
        "warmup": options.warmup,
        "runs": options.runs,
        **extra,
    }


def _autoregressive_job(options, target, base, report) -> tuple[dict | None, str]:
    if not options.autoregressive:
        return None, "not run: --no-autoregressive"
    if target.backend == "tensorrt":
        return None, (
            "not run: the TensorRT path has no autoregressive graph here; the "
            "roofline prediction stands in for it"
        )
    if target.checkpoint is None:
        return None, "not run: the source checkpoint is not available"
    extra = {"new_tokens": base.gen_length, "tokenizer": str(target.path)}
    if target.backend == "torch":
        return _job(
            options,
            target,
            "autoregressive",
            target.checkpoint,
            target.precision,
            {},
            **extra,
        ), "PyTorch eager, KV cache, MoE eager (top-k experts only)"
    from dllm_export.profiling.autoregressive_onnx import export_decoder

    dtype = target.precision if target.precision in ("fp32", "fp16", "bf16") else "fp32"
    folder = options.cache_dir / f"{target.fingerprint[:16]}-ar-ort-{dtype}"
    manifest = export_decoder(
        target.checkpoint, folder, moe="ort", dtype=dtype, report=report
    )
    how = (
        f"ONNX Runtime, prefill + decode graphs with past/present KV, MoE "
        f"{manifest['moe_used']}, {dtype}"
    )
    return _job(
        options, target, "autoregressive", folder, target.precision, {}, **extra
    ), how


def _measure_with(options):
    return run_isolated if options.isolate else run_job


def profile_target(target_path, options: ProfileOptions, report=None) -> dict:
    """Measure ``target_path`` on ``options.profile``'s device class; returns the result.

    Args:
        target_path: a checkpoint, an ONNX artifact or a TensorRT engine directory.
        options: what to measure and how (``ProfileOptions``).
        report: ``report(stage, detail)`` for exports, ``report(label, done, total)`` while
            measuring.
    """
    from dllm_export.device_profiles import load_profile
    from dllm_export.profiling.model_shape import model_shape

    report = report or (lambda *args: None)
    sweeps = [parse_sweep(text) for text in options.sweeps]  # bad flags fail first
    device_profile = load_profile(options.profile)
    target = resolve_target(target_path, options.backend, options.dtype)
    quality = options.quality == "on" or (
        options.quality == "auto" and is_default_model(target)
    )
    target, base, points = _prepare(options, target, sweeps, report)
    ar_job, ar_how = _autoregressive_job(options, target, base, report)
    shape = model_shape(target.config, target.family)
    measure = _measure_with(options)
    load_before = machine_load()
    results = []
    for index, point in enumerate(points):
        if quality and point.series == "seq_len":
            point.notes.append(
                "accuracy as the baseline's: a longer canvas adds padding"
            )
        job = _job(
            options,
            target,
            "diffusion",
            point.path,
            point.precision,
            point.sampler,
            seq_len=point.seq_len,
            # A longer canvas only adds masked-out padding: accuracy is the baseline's.
            quality_examples=options.quality_examples
            if quality and point.series != "seq_len"
            else 0,
            count_experts=index == 0 and bool(shape.moe_layers),
        )
        done = measure(
            job, lambda stage, d, t, label=point.label: report(f"{label} {stage}", d, t)
        )
        results.append(
            {
                "label": point.label,
                "series": point.series,
                "value": point.value,
                "precision": point.precision,
                "path": point.path,
                "settings": point.sampler,
                "notes": point.notes,
                **done,
            }
        )
    experts_hit = results[0].pop("experts_hit", None)
    if shape.moe_layers and experts_hit is None and target.checkpoint is not None:
        job = _job(
            options, target, "experts", target.checkpoint, "fp32", points[0].sampler
        )
        experts_hit = measure(job, lambda *a: report("experts", *a[1:]))["experts_hit"]
    autoregressive = {"how": ar_how}
    if ar_job is not None:
        autoregressive.update(
            measure(ar_job, lambda stage, d, t: report(f"autoregressive {stage}", d, t))
        )
    result = _assemble(
        target,
        device_profile,
        shape,
        base,
        results,
        autoregressive,
        experts_hit,
        options,
        load_before,
        quality,
    )
    result["target"]["requested"] = str(target_path)
    return result


def _assemble(
    target,
    device_profile,
    shape,
    base,
    results,
    autoregressive,
    experts_hit,
    options,
    load_before,
    quality,
) -> dict:
    for row in results:
        row["roofline"] = analysis.diffusion_roofline(
            shape, device_profile, row["precision"], row["measured"]
        )
    baseline = results[0]["measured"]
    ar_measured = autoregressive.get("measured")
    context = (ar_measured or {}).get("context_mean") or (
        baseline["prompt_length"]["median"] + base.gen_length / 2
    )
    autoregressive["roofline"] = analysis.autoregressive_roofline(
        shape, device_profile, target.precision, context, ar_measured
    )
    autoregressive["note"] = (
        "a diffusion-trained model run causally: its tokens are "
        "meaningless, only the speed is measured"
    )
    return {
        "format": "dllm-export-profile",
        "format_version": 1,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "target": target.describe(),
        "model": {
            "family": shape.family,
            "parameters": shape.total_parameters(),
            "layers": shape.layers,
            "hidden": shape.hidden,
            "vocab": shape.vocab,
            "experts": shape.experts,
            "experts_per_token": shape.experts_per_token,
        },
        "device_profile": {
            "name": device_profile.name,
            "description": device_profile.description,
            "bandwidth_gbs": device_profile.bandwidth_gbs,
            "peak_tflops": device_profile.peak_tflops,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": machine_load(),
            "isolated_processes": options.isolate,
            "threads": options.threads,
        },
        "sampler": asdict(base),
        "prompts": list(options.prompts or DEFAULT_PROMPTS),
        "quality_enabled": quality,
        "headline": analysis.headline(results[0], autoregressive),
        "points": results,
        "autoregressive": autoregressive,
        "moe": analysis.moe_traffic(
            shape, target.precision, baseline["canvas_length"], context, experts_hit
        ),
        "roofline_everywhere": analysis.roofline_everywhere(
            shape,
            baseline["canvas_length"],
            context,
            baseline["tokens_per_forward"],
            target.precision,
        ),
        "not_run": _not_run(target, options),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _not_run(target, options) -> list[str]:
    out = []
    if target.backend != "tensorrt":
        out.append(
            "TensorRT: not run in this profile (needs an engine directory on its GPU)"
        )
    if (
        options.device == "cpu"
        and target.backend != "tensorrt"
        and options.provider == "cpu"
    ):
        out.append("GPU: none used; device memory is not available")
    return out
