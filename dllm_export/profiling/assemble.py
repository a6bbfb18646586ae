"""The result of one ``profile`` run: measured points and baseline beside their roofline,
the MoE traffic, the floors on every shipped profile and the headline, as one JSON-able
dict (its layout is what ``report.py``, ``markdown.py`` and ``plots.py`` read)."""

from __future__ import annotations

import datetime
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from dllm_export.profiling import analysis
from dllm_export.profiling.stats import machine_load

AUTOREGRESSIVE_NOTE = (
    "a diffusion-trained model run causally: its tokens are meaningless, "
    "only the speed is measured"
)


@dataclass
class Measured:
    """What the jobs returned."""

    points: list  # one dict per point, the baseline first
    autoregressive: dict  # {"how": ...} plus the job's result when it ran
    experts_hit: dict | None  # experts.count_experts, or None
    load_before: dict
    prompts: list


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
    on_cpu = options.device == "cpu" and options.provider == "cpu"
    if on_cpu and target.backend != "tensorrt":
        out.append("GPU: none used; device memory is not available")
    return out


def _machine(options, load_before: dict) -> dict:
    return {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "python": platform.python_version(),
        "load_before": load_before,
        "load_after": machine_load(),
        "isolated_processes": options.isolate,
        "threads": options.threads,
        "rounds": options.rounds,
    }


def assemble(
    target, device_profile, shape, base, measured: Measured, options, quality: bool
) -> dict:
    """Attach the roofline to every measurement and lay the result out.

    Args:
        target: the resolved ``targets.Target``.
        device_profile: the ``DeviceProfile`` whose floors are used.
        shape: the model's ``ModelShape``.
        base: the baseline ``SamplerConfig``.
        measured: the jobs' results.
        options: the ``ProfileOptions`` used.
        quality: whether task accuracy was measured.
    """
    points, ar = measured.points, measured.autoregressive
    for row in points:
        row["roofline"] = analysis.diffusion_roofline(
            shape, device_profile, row["precision"], row["measured"], row.get("settings")
        )
    baseline = points[0]["measured"]
    ar_measured = ar.get("measured")
    context = (ar_measured or {}).get("context_mean") or (
        baseline["prompt_length"]["median"] + base.gen_length / 2
    )
    ar["roofline"] = analysis.autoregressive_roofline(
        shape, device_profile, target.precision, context, ar_measured
    )
    ar["note"] = AUTOREGRESSIVE_NOTE
    canvas = baseline["canvas_length"]
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
        "machine": _machine(options, measured.load_before),
        "sampler": asdict(base),
        "prompts": list(measured.prompts),
        "quality_enabled": quality,
        "headline": analysis.headline(points[0], ar),
        "points": points,
        "autoregressive": ar,
        "moe": analysis.moe_traffic(
            shape, target.precision, canvas, context, measured.experts_hit
        ),
        "roofline_everywhere": analysis.roofline_everywhere(
            shape, canvas, context, baseline["tokens_per_forward"], target.precision
        ),
        "not_run": _not_run(target, options),
    }
