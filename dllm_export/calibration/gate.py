"""The quality gate: a quantised candidate against its float artifact, on identical inputs.

The figures come from the quality harness (``dllm_export.eval.harness.evaluate``): top-1
agreement on masked answer positions at several mask ratios, the Monte-Carlo ELBO in bits
per answer token, exact-match task accuracy and token agreement of temperature-0
generations, all on the held-out task problems. The gate judges four of them against bars
(``GateBars``); the defaults per precision and the measurements behind them are in
docs/quantization.md. Task accuracy is judged only for the shipped default model, which is
trained on those tasks; for other models it is reported, not judged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class GateBars:
    min_agreement: float  # masked top-1 agreement with the float model, worst ratio
    max_elbo_increase: float  # relative increase of ELBO bits per token (0.05 = +5 %)
    max_task_drop: float  # absolute drop of mean task accuracy (default model only)
    min_generation_agreement: float  # share of equal generated tokens at temperature 0

    def updated(self, **overrides) -> "GateBars":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# Reasoning and measurements in docs/quantization.md: each bar sits below what sound
# methods reach on trained models, less the sampling noise of the worst of five ratios,
# and above what deliberately broken runs reach.
DEFAULT_BARS = {
    "int8": GateBars(
        min_agreement=0.85,
        max_elbo_increase=0.05,
        max_task_drop=0.05,
        min_generation_agreement=0.60,
    ),
    "fp8": GateBars(
        min_agreement=0.80,
        max_elbo_increase=0.05,
        max_task_drop=0.05,
        min_generation_agreement=0.60,
    ),
    "int4": GateBars(
        min_agreement=0.80,
        max_elbo_increase=0.15,
        max_task_drop=0.10,
        min_generation_agreement=0.40,
    ),
}


@dataclass
class GateSettings:
    samples: int = 16  # held-out problems per task
    mc_num: int = 16  # Monte-Carlo copies per sequence for the ELBO
    judge_tasks: bool = False  # True for the default model


def candidate_model(backend, float_model, path: str, precision: str):
    """An ``EvalModel`` over a candidate's backend, sharing the float model's tokenizer."""
    from dllm_export.eval.models import EvalModel, ModelInfo
    from dllm_export.runtime.api import Generator

    float_generator = float_model.generator
    generator = Generator(
        backend,
        float_generator.tokenizer,
        float_generator.special,
        float_generator.defaults,
        float_generator.family,
    )
    info = ModelInfo(
        path,
        "onnx",
        "onnxruntime",
        float_generator.family,
        backend.seq_len,
        backend.batch_size,
        precision,
    )
    return EvalModel(generator, info, logits_backend=backend)


def judge(report: dict, bars: GateBars, judge_tasks: bool) -> dict:
    """Checks of a harness comparison report against ``bars``."""
    agreement = report["agreement"]
    worst_ratio, worst = min(agreement["masked"].items(), key=lambda item: item[1])
    float_bits = report["model"]["elbo"].get("bits_per_token")
    quant_bits = report["other"]["elbo"].get("bits_per_token")
    increase = (quant_bits - float_bits) / float_bits if float_bits else None
    task_drop = -report["deltas"]["task_accuracy"]["mean"]
    generation = agreement["generation"]["token_agreement"]
    checks = [
        {
            "name": "masked top-1 agreement (worst ratio)",
            "value": worst,
            "at": worst_ratio,
            "bar": bars.min_agreement,
            "passed": worst >= bars.min_agreement,
        },
        {
            "name": "ELBO bits/token increase",
            "value": increase,
            "float": float_bits,
            "quantized": quant_bits,
            "bar": bars.max_elbo_increase,
            "passed": increase is None or increase <= bars.max_elbo_increase,
        },
        {
            "name": "generation token agreement",
            "value": generation,
            "bar": bars.min_generation_agreement,
            "passed": generation >= bars.min_generation_agreement,
        },
        {
            "name": "task accuracy drop",
            "value": task_drop,
            "bar": bars.max_task_drop,
            "float": report["model"]["tasks"]["mean"],
            "quantized": report["other"]["tasks"]["mean"],
            "judged": judge_tasks,
            "passed": (not judge_tasks) or task_drop <= bars.max_task_drop,
        },
    ]
    return {
        "passed": all(c["passed"] for c in checks),
        "bars": asdict(bars),
        "checks": checks,
    }


def _fitting_sampler(float_model, samples: int) -> dict:
    """Sampler overrides so the longest held-out prompt fits the fixed canvas: the model's
    defaults when they fit, else one block filling what is left (steps = tokens)."""
    from dllm_export.eval import tasks

    generator = float_model.generator
    seq_len = generator.backend.seq_len
    longest = max(
        len(generator.tokenizer.format_prompt(e.prompt, chat=True))
        for task in tasks.TASKS
        for e in tasks.held_out_examples(task, samples)
    )
    if seq_len is None or longest + generator.defaults.gen_length <= seq_len:
        return {}
    room = seq_len - longest
    if room < 1:
        from dllm_export.errors import DllmExportError

        raise DllmExportError(
            f"the gate's task prompts need {longest} tokens but the artifact's canvas holds "
            f"{seq_len}; re-export with a larger --seq-len, or pass --no-gate"
        )
    return {"gen_length": room, "steps": room, "block_length": room}


def run_gate(
    float_model, candidate, bars: GateBars, settings: GateSettings, progress=None
) -> dict:
    """Compare ``candidate`` with ``float_model`` (both ``EvalModel``) and judge it.
    Block-causal models generate with their block cache (the only way they decode).

    Returns:
        ``{"passed", "bars", "checks": [...], "report": <harness report>}``.
    """
    from dllm_export.eval.harness import EvalOptions, evaluate

    cache = float_model.generator.backend.manifest.get("cache") or {}
    sampler = (_cached_sampler(float_model, settings.samples)[1]
               if cache.get("attention", "bidirectional") != "bidirectional"
               else _fitting_sampler(float_model, settings.samples))
    options = EvalOptions(
        samples=settings.samples,
        ratios=RATIOS,
        mc_num=settings.mc_num,
        mc_batch=min(settings.mc_num, 16),
        sampler=sampler,
    )
    report = evaluate(float_model, other=candidate, options=options, progress=progress)
    verdict = judge(report, bars, settings.judge_tasks)
    verdict["report"] = {
        key: report[key] for key in ("settings", "agreement", "deltas")
    }
    verdict["report"]["float"] = {
        k: report["model"][k] for k in ("masked", "elbo", "tasks")
    }
    verdict["report"]["quantized"] = {
        k: report["other"][k] for k in ("masked", "elbo", "tasks")
    }
    return verdict


def _cached_sampler(float_model, samples: int) -> tuple[str, dict]:
    """The cache mode users decode with (block for block-causal models, else Fast-dLLM's
    dual cache) and a block schedule that fits the artifact's graphs and canvas."""
    generator = float_model.generator
    cache = generator.backend.manifest["cache"]
    if generator.defaults.algorithm == "tidar":  # draft-and-verify over the exact cache
        fitted = _fitting_sampler(float_model, samples)
        gen = fitted.get("gen_length", generator.defaults.gen_length)
        return "draft-and-verify", {"algorithm": "tidar", "gen_length": gen, "steps": gen,
                                    "block_length": cache["block_length"]}
    mode = "block" if cache["attention"] == "block_causal" else "dual"
    fitted = _fitting_sampler(float_model, samples)
    block = cache["block_length"]
    gen = fitted.get("gen_length", generator.defaults.gen_length)
    if gen >= block:
        gen = gen // block * block
    else:
        block = gen
    # LLaDA's schedule decodes blocks for every family (Dream's own sampler does not);
    # LLaDA2 keeps its own threshold sampler
    algorithm = "llada2" if generator.defaults.algorithm == "llada2" else "llada"
    return mode, {"algorithm": algorithm, "gen_length": gen, "steps": gen,
                  "block_length": block, "cache": mode}


def run_cached_gate(verdict: dict, float_model, candidate, bars: GateBars,
                    settings: GateSettings, progress=None) -> dict:
    """Cached decoding of the candidate against cached decoding of the float artifact (the
    step graphs are quantised too): their generations must agree like the canvas ones.
    Adds checks to ``verdict`` in place and returns it."""
    from dllm_export.eval.harness import EvalOptions, evaluate

    mode, sampler = _cached_sampler(float_model, settings.samples)
    options = EvalOptions(samples=settings.samples, ratios=(0.5,), mc_num=0, sampler=sampler)
    report = evaluate(float_model, other=candidate, options=options, progress=progress)
    generation = report["agreement"]["generation"]["token_agreement"]
    task_drop = -report["deltas"]["task_accuracy"]["mean"]
    verdict["checks"] += [
        {
            "name": f"generation token agreement ({mode} cache)",
            "value": generation,
            "bar": bars.min_generation_agreement,
            "passed": generation >= bars.min_generation_agreement,
        },
        {
            "name": f"task accuracy drop ({mode} cache)",
            "value": task_drop,
            "bar": bars.max_task_drop,
            "float": report["model"]["tasks"]["mean"],
            "quantized": report["other"]["tasks"]["mean"],
            "judged": settings.judge_tasks,
            "passed": (not settings.judge_tasks) or task_drop <= bars.max_task_drop,
        },
    ]
    verdict["passed"] = all(c["passed"] for c in verdict["checks"])
    verdict["report"]["cached"] = {
        "cache": mode, "sampler": sampler, "agreement": report["agreement"]["generation"],
        "float_tasks": report["model"]["tasks"], "quantized_tasks": report["other"]["tasks"],
    }
    return verdict
