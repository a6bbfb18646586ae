"""Task accuracy beside the speed: exact match on the held-out split of ``eval/tasks.py``.

Quality is defined for the shipped default model, which is trained on those tasks; on
other checkpoints the numbers would measure nothing. The quality harness
(``dllm_export.eval.harness.evaluate``) computes it when present; otherwise the exact match
is computed here from ``eval/tasks.py`` directly, and a missing harness is reported rather
than raised.
"""

from __future__ import annotations

import time
from dataclasses import asdict

METRIC = "exact match on eval/tasks.py held-out problems"


def _with_harness(
    generator, config, examples_per_task: int, seed: int, progress
) -> dict:
    from dllm_export.eval.harness import EvalOptions, evaluate

    # Generation accuracy is what a speed curve needs: one mask ratio, no ELBO.
    options = EvalOptions(
        samples=examples_per_task,
        ratios=(0.5,),
        mc_num=0,
        held_out_seed=seed,
        sampler=asdict(config),
    )
    stages = ("load", "masked", "elbo", "generate")

    def on_stage(stage, detail=""):
        if progress and stage in stages:
            progress(stages.index(stage), len(stages))

    report = evaluate(generator, options=options, progress=on_stage)
    if progress:
        progress(len(stages), len(stages))
    tasks = report["model"]["tasks"]
    return {
        "accuracy": tasks["mean"],
        "per_task": {k: v["accuracy"] for k, v in tasks.items() if k != "mean"},
        "masked_accuracy_at_0.5": report["model"]["masked"]["0.5"]["accuracy"],
        "examples": examples_per_task * len(options.tasks),
        "seed": seed,
        "metric": METRIC,
        "computed_by": "dllm_export.eval.harness.evaluate",
    }


def _by_hand(
    tasks, generator, config, examples_per_task: int, seed: int, progress
) -> dict:
    batch = generator.backend.batch_size or 16
    overrides = asdict(config)
    per_task, total, done = {}, 0, 0
    for task in tasks.TASKS:
        examples = tasks.held_out_examples(task, examples_per_task, seed=seed)
        correct = 0
        for start in range(0, len(examples), batch):
            chunk = examples[start : start + batch]
            out = generator.generate(
                [e.prompt for e in chunk], chat=True, truncate=True, **overrides
            )
            correct += sum(
                tasks.score(text, e) for text, e in zip(out.texts, chunk, strict=True)
            )
            done += len(chunk)
            if progress:
                progress(done, examples_per_task * len(tasks.TASKS))
        per_task[task] = correct / len(examples)
        total += correct
    return {
        "accuracy": total / (examples_per_task * len(tasks.TASKS)),
        "per_task": per_task,
        "examples": examples_per_task * len(tasks.TASKS),
        "seed": seed,
        "metric": METRIC,
        "computed_by": "dllm_export.profiling.quality (eval/tasks.py held-out split)",
    }


def task_quality(
    generator, config, examples_per_task: int, seed: int = 0, progress=None
) -> dict:
    """Exact-match accuracy per task and their mean, with the sampler settings measured.

    Args:
        generator: a ``runtime.Generator``.
        config: the ``SamplerConfig`` the speed was measured with.
        examples_per_task: held-out problems per task.
        seed: which fixed held-out sample (0 is the documented one).
        progress: ``progress(done, total)`` as batches finish.
    """
    try:
        from dllm_export.eval import tasks
    except ImportError as err:
        return {"quality": f"not available: {err}"}
    started = time.perf_counter()
    try:
        result = _with_harness(generator, config, examples_per_task, seed, progress)
    except ImportError:
        result = _by_hand(tasks, generator, config, examples_per_task, seed, progress)
    result["seconds"] = time.perf_counter() - started
    return result
