"""``dllm-export eval``: the quality report every stage is judged by.

    from dllm_export.eval.harness import EvalOptions, evaluate
    report = evaluate("out/default-onnx", other="dllm_export/data/default-model",
                      options=EvalOptions(samples=50))

A model is a checkpoint directory (PyTorch), an artifact or engine directory (ONNX
Runtime, TensorRT) or a ``runtime.Generator``. Every figure comes from the held-out
problems of ``tasks.py`` (``samples`` per task) laid out as generation fills the canvas
(``canvas.py``), and two models see identical inputs.

Returned keys (ratios are keys like "0.1"; deltas are other minus model):

- ``settings``: tasks, samples, held_out_seed, ratios, mc_num, mc_batch, seed, seq_len
  (canvas length, None for the longest sequence), batch, sampler (every SamplerConfig field)
- ``model``, and ``other`` when comparing, each with:
  - ``info``: path, kind, backend, family, seq_len, batch, precision
  - ``masked``: {ratio: {"accuracy", "positions"}}, top-1 accuracy on masked answer tokens
    (end of turn included; the EOS filler is masked at the same ratio, never scored)
  - ``elbo``: {"bits_per_token", "per_task": {task: bits}, "answer_tokens",
    "response_tokens"}: the Monte-Carlo ELBO (``likelihood.py``) of each response region
    (answer, end of turn, EOS filler to gen_length) in bits per answer token (end of turn
    included), or {"skipped": reason} without full logits
  - ``tasks``: {task: {"accuracy", "correct", "count"}, "mean": accuracy}, exact match
  - ``speed``: tokens_per_forward, tokens_per_second, generated_tokens, forwards, seconds,
    batch (``generation.py``)
- ``cache_modes`` (with ``cache_modes``): per cache mode and per threshold (None: the
  sampler's schedule), the first model's ``tasks``, ``speed`` and ``agreement_with_none``
  (generation agreement with the ``none`` run of the same threshold): what an
  approximate cache costs in accuracy, beside what it gains in speed
- ``samplers`` (with ``samplers``): per model ("model", "other") and decoding mode of a
  draft-and-verify model (``tidar.SAMPLERS``), ``tasks``, ``speed`` (batch 1, the modes
  timed interleaved prompt by prompt) and ``agreement`` with the same model's first mode
  (named by ``agreement_with``), ``vs_base`` (``speedup`` in tokens/s and
  ``accuracy_points`` against the other model's autoregressive run, else the model's own);
  a mode the model cannot decode in has ``skipped`` (why)
- ``agreement`` (comparing): ``masked`` {ratio: top-1 agreement on those positions},
  ``generation`` {"identical_share", "token_agreement"}
- ``deltas`` (comparing): masked_accuracy {ratio}, elbo_bits_per_token, task_accuracy
  {task, "mean"}, tokens_per_forward, tokens_per_second
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from os import PathLike

from dllm_export.errors import DllmExportError
from dllm_export.eval import tasks as task_module
from dllm_export.eval.canvas import task_sequence
from dllm_export.eval.generation import (
    GenerationRun,
    generate_all,
    generation_agreement,
    task_scores,
)
from dllm_export.eval.likelihood import bits_per_token, check_mc, elbo
from dllm_export.eval.masked import DEFAULT_RATIOS, masked_accuracy, ratio_key
from dllm_export.eval.models import EvalModel, common_shape


@dataclass
class EvalOptions:
    tasks: tuple[str, ...] | str | None = None  # names, or "add,sort"; None: every task
    samples: int = 50  # held-out problems per task
    ratios: tuple[float, ...] | str | None = None  # or "0.1,0.5"; None: 0.1 ... 0.9
    mc_num: int = 32  # Monte-Carlo copies per sequence for the ELBO (0: skip it)
    mc_batch: int = 16  # stratification group (LLaDA's batch_size)
    seed: int = 0  # which positions are masked, for accuracy and the ELBO
    held_out_seed: int = 0  # which held-out problems (tasks.held_out_examples)
    batch: int | None = None  # rows per forward; None: the artifact's batch, or 16
    sampler: dict = field(default_factory=dict)  # SamplerConfig overrides for generation
    provider: str = "cpu"  # ONNX Runtime provider for artifacts
    threads: int | None = None  # ONNX Runtime intra-op threads
    cache_modes: tuple[str, ...] | str | None = None  # e.g. "none,dual": generation per mode
    thresholds: tuple[float, ...] | str | None = None  # each mode also with these thresholds
    # e.g. "autoregressive,block,lossless": generation per decoding mode of a
    # draft-and-verify model (algorithm tidar), every model, timed interleaved
    samplers: tuple[str, ...] | str | None = None

    def __post_init__(self):
        self.tasks = _names(self.tasks) if self.tasks is not None else task_module.TASKS
        unknown = [t for t in self.tasks if t not in task_module.TASKS]
        if unknown or not self.tasks:
            raise DllmExportError(
                f"--tasks {','.join(self.tasks) or '(none)'}: unknown "
                f"{', '.join(unknown) or 'empty list'}; choose from {','.join(task_module.TASKS)}")
        if self.samples < 1:
            raise DllmExportError(f"--samples {self.samples}: use at least 1 problem per task")
        self.ratios = _ratios(self.ratios) if self.ratios is not None else DEFAULT_RATIOS
        if self.mc_num:
            self.mc_batch = check_mc(self.mc_num, self.mc_batch)
        if self.batch is not None and self.batch < 1:
            raise DllmExportError(f"--batch {self.batch}: use at least 1")
        if self.cache_modes is not None:
            from dllm_export.runtime.cache import MODES

            self.cache_modes = _names(self.cache_modes)
            unknown = [m for m in self.cache_modes if m not in MODES]
            if unknown or not self.cache_modes:
                raise DllmExportError(
                    f"--cache-modes {','.join(self.cache_modes)}: choose from {','.join(MODES)}")
        self.thresholds = _ratios(self.thresholds, "--thresholds") if self.thresholds else ()
        if self.samplers is not None:
            from dllm_export.runtime.tidar import SAMPLERS

            self.samplers = _names(self.samplers)
            unknown = [m for m in self.samplers if m not in SAMPLERS]
            if unknown or not self.samplers:
                raise DllmExportError(
                    f"--samplers {','.join(self.samplers)}: choose from {','.join(SAMPLERS)}")


def _names(value) -> tuple[str, ...]:
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(p.strip() for p in parts if p.strip())


def _ratios(value, flag: str = "--ratios") -> tuple[float, ...]:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        ratios = tuple(float(r) for r in parts)
    except ValueError:
        raise DllmExportError(f"{flag} {value!r}: give numbers like 0.1,0.5") from None
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise DllmExportError(f"{flag} {value!r}: give values in (0, 1]")
    return ratios


def _cache_modes(evaluated, examples, options, config, seq_len, batch, progress) -> list:
    """Task accuracy and speed of generation in each cache mode (the first model)."""
    prompts = [e.prompt for e in examples]
    out, by_threshold = [], {}
    for threshold in (None, *options.thresholds):
        for mode in options.cache_modes:
            progress("cache modes", f"{mode}, threshold {threshold}")
            settings = config.updated(cache=mode, threshold=threshold)
            if threshold is None:
                settings = replace(settings, threshold=None)
            run = generate_all(evaluated.generator_for(settings, seq_len), prompts, batch)
            by_threshold.setdefault(threshold, run)  # the first mode is the reference
            out.append({"cache": mode, "threshold": threshold,
                        "tasks": task_scores(examples, run.texts), "speed": run.speed(batch),
                        "agreement_with_" + options.cache_modes[0]:
                            generation_agreement(by_threshold[threshold].tokens, run.tokens)})
    return out


def _samplers(models, examples, options, seq_len, progress) -> list:
    """Task accuracy and speed of each decoding mode of a draft-and-verify model, for
    every model (each with its own defaults otherwise), one prompt at a time and the modes
    interleaved prompt by prompt, so that a noisy machine slows them alike."""
    prompts = [e.prompt for e in examples]
    runs, skipped = [], []
    for index, evaluated in enumerate(models):
        base = evaluated.generator.config(**options.sampler)
        for sampler in options.samplers:
            config = base.updated(algorithm="tidar", tidar_sampler=sampler)
            generator = evaluated.generator_for(config, seq_len)
            row = {"model": "model" if index == 0 else "other", "sampler": sampler}
            try:
                generator.generate(prompts[:1], chat=True)  # warm-up, untimed
            except DllmExportError as error:  # a mode this model cannot decode in
                skipped.append({**row, "skipped": str(error)})
                continue
            runs.append((row, generator, GenerationRun()))
    for number, prompt in enumerate(prompts):
        progress("samplers", f"prompt {number + 1}/{len(prompts)} x {len(runs)} modes")
        for _, generator, run in runs:
            run.add(generator.generate([prompt], chat=True), 1)
    out, reference = [], {}
    for row, _, run in runs:
        reference.setdefault(row["model"], (row["sampler"], run))
        first, first_run = reference[row["model"]]
        out.append({**row, "tasks": task_scores(examples, run.texts), "speed": run.speed(1),
                    "agreement_with": first,
                    "agreement": generation_agreement(first_run.tokens, run.tokens)})
    _against_base(out)
    return out + skipped


def _against_base(rows: list) -> None:
    """Adds ``vs_base`` to each row: its tokens/s over the baseline's (``speedup``) and its
    mean task accuracy minus the baseline's in points. The baseline is the compared
    model's autoregressive run (an autoregressive base beside its conversion), else the
    model's own autoregressive run."""
    runs = {(r["model"], r["sampler"]): r for r in rows}
    base = runs.get(("other", "autoregressive")) or runs.get(("model", "autoregressive"))
    if base is None:
        return
    name = f"{base['model']} autoregressive"
    rate = base["speed"]["tokens_per_second"]
    for row in rows:
        row["vs_base"] = {
            "baseline": name,
            "speedup": round(row["speed"]["tokens_per_second"] / rate, 3) if rate else None,
            "accuracy_points": round(100 * (row["tasks"]["mean"] - base["tasks"]["mean"]), 1)}


def _open(model, options: EvalOptions) -> EvalModel:
    if isinstance(model, EvalModel):
        return model
    if hasattr(model, "generate") and hasattr(model, "backend"):
        return EvalModel.from_generator(model)
    return EvalModel.open(model, provider=options.provider, threads=options.threads)


def _check_comparable(first: EvalModel, second: EvalModel, sequences, examples,
                      gen_length: int) -> None:
    if first.special != second.special:
        raise DllmExportError(
            f"special tokens differ ({first.special} vs {second.special}); compare "
            "exports of the same checkpoint")
    theirs = [task_sequence(second.tokenizer, second.special, e, gen_length)
              for e in examples[:20]]
    if theirs != sequences[: len(theirs)]:
        raise DllmExportError("the two models tokenize the task prompts differently; "
                              "compare exports of the same checkpoint")


def _elbo_reports(models, sequences, options, seq_len) -> list[dict]:
    if not options.mc_num:
        return [{"skipped": "--mc-num 0"} for _ in models]
    able = [m for m in models if m.has_logits()]
    estimates = dict(zip(map(id, able), elbo(
        able, sequences, options.mc_num, options.mc_batch, options.seed, seq_len), strict=True))
    reports = []
    for model in models:
        if id(model) not in estimates:
            reports.append({"skipped": f"the {model.info.backend} backend has no logits"})
            continue
        values = estimates[id(model)]
        per_task = {}
        for task in options.tasks:
            rows = [i for i, s in enumerate(sequences) if s.task == task]
            per_task[task] = bits_per_token(values[rows], [sequences[i] for i in rows])
        reports.append({"bits_per_token": bits_per_token(values, sequences),
                        "per_task": per_task,
                        "answer_tokens": sum(len(s.target) for s in sequences),
                        "response_tokens": sum(len(s.region) for s in sequences)})
    return reports


def _deltas(first: dict, second: dict) -> dict:
    def delta(a, b):
        return None if a is None or b is None else b - a

    return {
        "masked_accuracy": {k: second["masked"][k]["accuracy"] - v["accuracy"]
                            for k, v in first["masked"].items()},
        "elbo_bits_per_token": delta(first["elbo"].get("bits_per_token"),
                                     second["elbo"].get("bits_per_token")),
        "task_accuracy": {k: delta(first["tasks"][k] if k == "mean" else
                                   first["tasks"][k]["accuracy"],
                                   second["tasks"][k] if k == "mean" else
                                   second["tasks"][k]["accuracy"])
                          for k in first["tasks"]},
        "tokens_per_forward": delta(first["speed"]["tokens_per_forward"],
                                    second["speed"]["tokens_per_forward"]),
        "tokens_per_second": delta(first["speed"]["tokens_per_second"],
                                   second["speed"]["tokens_per_second"]),
    }


def _settings(options: EvalOptions, seq_len, batch: int, config) -> dict:
    return {
        "tasks": list(options.tasks), "samples": options.samples,
        "held_out_seed": options.held_out_seed,
        "ratios": [ratio_key(r) for r in options.ratios], "mc_num": options.mc_num,
        "mc_batch": options.mc_batch, "seed": options.seed, "seq_len": seq_len,
        "batch": batch, "sampler": asdict(config),
    }


def evaluate(model, other=None, options: EvalOptions | None = None, progress=None) -> dict:
    """The quality report of ``model`` (and of ``other`` beside it, with agreement and
    deltas). See the module docstring for the keys.

    Args:
        model: checkpoint or artifact directory, ``runtime.Generator`` or ``EvalModel``.
        other: a second model to compare on identical inputs, or None.
        options: ``EvalOptions`` (defaults: every task, 50 problems each).
        progress: ``progress(stage, detail)`` callback, or None.
    Returns:
        A JSON-serialisable dict.
    """
    options = options or EvalOptions()
    progress = progress or (lambda stage, detail="": None)
    progress("load", str(model))
    models = [_open(model, options)]
    if other is not None:
        progress("load", str(other))
        models.append(_open(other, options))
    seq_len, batch = common_shape(models, options.batch)
    for evaluated in models:  # scoring runs at each model's own batch; generation shares one
        evaluated.use_batch(options.batch)
    examples = [e for task in options.tasks
                for e in task_module.held_out_examples(task, options.samples,
                                                       options.held_out_seed)]
    config = models[0].generator.config(**options.sampler)
    sequences = [task_sequence(models[0].tokenizer, models[0].special, e, config.gen_length)
                 for e in examples]
    if len(models) > 1:
        _check_comparable(models[0], models[1], sequences, examples, config.gen_length)

    progress("masked", f"{len(sequences)} sequences x {len(options.ratios)} ratios")
    masked = masked_accuracy(models, sequences, options.ratios, options.seed, seq_len)
    progress("elbo", f"{len(sequences)} sequences x {options.mc_num} copies")
    elbos = _elbo_reports(models, sequences, options, seq_len)

    prompts = [e.prompt for e in examples]
    runs = []
    for index, evaluated in enumerate(models):
        progress("generate", f"model {index + 1}: {len(prompts)} prompts")
        runs.append(generate_all(evaluated.generator_for(config, seq_len), prompts, batch))

    reports = [{
        "info": asdict(evaluated.info),
        "masked": {k: {"accuracy": v["accuracy"][index], "positions": v["positions"]}
                   for k, v in masked.items()},
        "elbo": elbos[index],
        "tasks": task_scores(examples, runs[index].texts),
        "speed": runs[index].speed(batch),
    } for index, evaluated in enumerate(models)]
    report = {"settings": _settings(options, seq_len, batch, config), "model": reports[0]}
    if options.cache_modes:
        report["cache_modes"] = _cache_modes(models[0], examples, options, config, seq_len,
                                             batch, progress)
    if options.samplers:
        report["samplers"] = _samplers(models, examples, options, seq_len, progress)
    if len(models) > 1:
        report["other"] = reports[1]
        report["agreement"] = {
            "masked": {k: v["agreement"] for k, v in masked.items()},
            "generation": generation_agreement(runs[0].tokens, runs[1].tokens),
        }
        report["deltas"] = _deltas(reports[0], reports[1])
    for evaluated, given in zip(models, (model, other), strict=False):
        if isinstance(given, (str, PathLike)):  # opened here, so closed here
            evaluated.close()
    return report
