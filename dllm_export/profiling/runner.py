"""``profile``: measure a target on its backend, beside the roofline and an autoregressive
baseline, over optional sweeps. Returns one JSON-able dict; ``report.py`` writes it out.

Order of work: resolve the target and the sampler settings, check every sweep point (so a
bad flag fails before anything is measured), export what is missing (cached), then run the
jobs one after another, each in its own process by default (``jobs.run_isolated``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dllm_export.errors import DllmExportError, check_at_least
from dllm_export.export.onnx import DEFAULT_MOE
from dllm_export.profiling.assemble import Measured, assemble
from dllm_export.profiling.jobs import run_isolated, run_job
from dllm_export.profiling.stats import machine_load
from dllm_export.profiling.sweeps import build_points, parse_sweep
from dllm_export.profiling.targets import (
    DEFAULT_CACHE,
    as_artifact_target,
    cached_artifact,
    is_task_model,
    resolve_target,
    with_cached_graphs,
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
    rounds: int = 1  # every point measured this many times, in fresh processes
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
        if self.runs < 1 or self.warmup < 0 or self.rounds < 1:
            raise DllmExportError(
                "--runs and --rounds must be at least 1 and --warmup at least 0"
            )
        check_at_least("--threads", self.threads, 1, 1024)
        check_at_least("--seq-len", self.seq_len, 2)
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
    base = base.updated(**overrides)
    if base.algorithm == "tidar" and "early_exit" not in overrides:
        # the autoregressive baseline decodes gen_length tokens with no early stop; draft-
        # and-verify fills as many positions, so that their tokens/s compare like for like
        base = base.updated(early_exit=False)
    return base


def _prepare(options: ProfileOptions, target, sweeps, report):
    """Targets that need an artifact made first, and the points to measure."""
    if target.kind == "checkpoint" and target.backend == "onnxruntime":
        from dllm_export.device_profiles import load_profile

        length = options.seq_len or load_profile(options.profile).build.seq_len
        artifact = cached_artifact(
            target, length, options.moe or DEFAULT_MOE, options.cache_dir, report
        )
        target = as_artifact_target(target, artifact)
    base = _base_config(target, options.sampler)
    points = build_points(target, base, sweeps)
    cached_points = [p for p in points if (p.sampler.get("cache") or "none") != "none"]
    if cached_points and target.backend == "onnxruntime":
        artifact = with_cached_graphs(target, options.cache_dir, report)
        if artifact is None:
            raise DllmExportError(
                f"{target.path}: cache modes need the cached graphs; export with --cache "
                "(the source checkpoint is gone, so profile cannot)")
        for point in cached_points:
            point.path = str(artifact)
    for point in points:
        if point.series != "seq_len" and target.backend == "torch":
            point.seq_len = options.seq_len  # every point on the same (fixed) canvas
        if point.series == "seq_len" and target.backend == "onnxruntime":
            moe = target.moe_strategy or options.moe or DEFAULT_MOE
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
    """The causal mode of the same backbone on the same backend: the checkpoint in PyTorch,
    or an artifact's own prefill and decode graphs on ONNX Runtime."""
    if not options.autoregressive:
        return None, "not run: --no-autoregressive"
    if target.backend == "tensorrt":
        return None, (
            "not run: engines are built from the canvas graph only here; the roofline "
            "prediction stands in for it"
        )
    extra = {"new_tokens": base.gen_length}
    if target.backend == "torch":
        return _job(options, target, "autoregressive", target.checkpoint, target.precision,
                    {}, **extra), "PyTorch eager, the family's forward in causal mode with its KV cache"
    artifact = with_cached_graphs(target, options.cache_dir, report)
    if artifact is None:
        return None, "not run: the artifact has no cached graphs and its checkpoint is gone"
    moe = (target.manifest.get("moe") or {}).get("strategy")
    how = ("ONNX Runtime, the artifact's prefill + decode graphs (the causal mode of the same "
           f"export{', MoE ' + moe if moe else ''}, {target.precision})")
    return _job(options, target, "autoregressive", artifact, target.precision, {},
                **extra), how


def _round(index: int, options) -> str:
    return f" (round {index + 1}/{options.rounds})" if options.rounds > 1 else ""


def _best(rounds: list[dict], latency: str) -> dict:
    """The round with the lowest median latency: the least disturbed by other jobs on a
    shared machine. Every round's median is kept beside it."""
    best = min(
        rounds, key=lambda r: r["measured"][latency].get("median_ms", float("inf"))
    )
    best = dict(best)
    best["rounds_median_ms"] = [r["measured"][latency].get("median_ms") for r in rounds]
    return best


def _measure_points(
    options, target, points, quality, moe, measure, report
) -> list[dict]:
    """Every point, round after round (so that noise spreads over all points), then the
    best round of each. Accuracy and expert counts are taken in the first round only."""
    by_point = [[] for _ in points]
    for round_index in range(options.rounds):
        for index, point in enumerate(points):
            first = round_index == 0
            # A longer canvas only adds masked-out padding: accuracy is the baseline's.
            scored = quality and first and point.series != "seq_len"
            job = _job(
                options,
                target,
                "diffusion",
                point.path,
                point.precision,
                point.sampler,
                seq_len=point.seq_len,
                quality_examples=options.quality_examples if scored else 0,
                count_experts=first and index == 0 and moe,
            )
            suffix = _round(round_index, options)
            by_point[index].append(
                measure(
                    job,
                    lambda stage, d, t, label=point.label, suffix=suffix: report(
                        f"{label} {stage}{suffix}", d, t
                    ),
                )
            )
    results = []
    for point, rounds in zip(points, by_point, strict=True):
        if quality and point.series == "seq_len":
            point.notes.append(
                "accuracy as the baseline's: a longer canvas adds padding"
            )
        best = _best(rounds, "forward")
        for key in ("quality", "experts_hit"):  # measured in the first round only
            if key in rounds[0]:
                best[key] = rounds[0][key]
        results.append(
            {
                "label": point.label,
                "series": point.series,
                "value": point.value,
                "precision": point.precision,
                "path": point.path,
                "settings": point.sampler,
                "notes": point.notes,
                **best,
            }
        )
    return results


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
    from dllm_export.model_shape import model_shape

    report = report or (lambda *args: None)
    sweeps = [parse_sweep(text) for text in options.sweeps]  # bad flags fail first
    device_profile = load_profile(options.profile)
    target = resolve_target(target_path, options.backend, options.dtype)
    quality = options.quality == "on" or (
        options.quality == "auto" and is_task_model(target)
    )
    target, base, points = _prepare(options, target, sweeps, report)
    ar_job, ar_how = _autoregressive_job(options, target, base, report)
    shape = model_shape(target.config, target.family)
    measure = _measure_with(options)
    load_before = machine_load()
    results = _measure_points(
        options, target, points, quality, bool(shape.moe_layers), measure, report
    )
    experts_hit = results[0].pop("experts_hit", None)
    if shape.moe_layers and experts_hit is None and target.checkpoint is not None:
        job = _job(
            options, target, "experts", target.checkpoint, "fp32", points[0].sampler
        )
        experts_hit = measure(job, lambda *a: report("experts", *a[1:]))["experts_hit"]
    autoregressive = {"how": ar_how}
    if ar_job is not None:
        rounds = [
            measure(
                ar_job,
                lambda stage, d, t, r=r: report(
                    f"autoregressive {stage}{_round(r, options)}", d, t
                ),
            )
            for r in range(options.rounds)
        ]
        autoregressive.update(_best(rounds, "token"))
    measured = Measured(
        results,
        autoregressive,
        experts_hit,
        load_before,
        list(options.prompts or DEFAULT_PROMPTS),
    )
    result = assemble(target, device_profile, shape, base, measured, options, quality)
    result["target"]["requested"] = str(target_path)
    return result
