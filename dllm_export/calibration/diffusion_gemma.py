"""``quantize`` for a DiffusionGemma artifact (export/diffusion_gemma.py): its prefill,
commit and decoder graphs quantised on its own denoising states and judged by its own gate.

Calibration states: the float artifact generates from the calibration prompts with its own
sampler (runtime/diffusion_gemma.py: uniform-noise canvases, the temperature schedule, the
previous step's self-conditioning signal, re-noised rejected positions), and the feeds of
every graph are recorded as they run; a seeded reservoir keeps ``--samples`` of each
graph's, drawn evenly from every step of every canvas. INT8 (``minmax``, ``entropy``,
``percentile``) calibrates its Q/DQ activation ranges on them; INT4 and INT8 ``nbits`` are
weight-only ``MatMulNBits`` blocks (ONNX Runtime) and INT4 ``ort-dq`` the same weights in
``DequantizeLinear`` blocks (TensorRT and ONNX Runtime; the default for a TensorRT
``--profile``): they need none. Every linear layer is quantised but the
routers (a flipped top-8 choice sends a token to other experts) and the tied embedding the
decoder reads for its soft embeddings; the experts are about 95 % of the 26B-A4B's weights.
The three graphs then share one weights file again.

The gate: the masked-diffusion gate (gate.py) measures masked-token agreement and an ELBO,
which need a mask token; DiffusionGemma has none. On held-out task prompts the float
artifact generates while the candidate runs in lockstep (``PairedSteps``): the same canvas
at every step, the same uniforms, but the candidate's own cache (its encoder graphs write
it) and its own self-conditioning chain. Per decoder step: argmax agreement, agreement of
the inverse-CDF samples under the same uniforms (a measure of how close the two
distributions are), and the entropy difference. Then the candidate generates alone with
the same seeded noise and its tokens are compared with the float's. Judged: argmax
agreement in the worst third of the denoising steps (early, middle, late) against the
precision's ``min_agreement``, generation token agreement against
``min_generation_agreement`` and, for the shipped task-trained model, the drop in
exact-match task accuracy against ``max_task_drop`` (gate.DEFAULT_BARS); the rest is
reported.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import asdict
from itertools import takewhile
from pathlib import Path

import numpy as np

from dllm_export.calibration import methods as method_table
from dllm_export.calibration.clock import format_seconds
from dllm_export.calibration.gate import DEFAULT_BARS
from dllm_export.calibration.recipes import Recipe, select_nodes
from dllm_export.errors import DllmExportError
from dllm_export.integrity import record_files
from dllm_export.jsonio import atomic_directory, check_output, read_json, write_json
from dllm_export.runtime.diffusion_gemma import GemmaGenerator, OnnxSteps
from dllm_export.shipped import trained_on_tasks

GRAPHS = ("prefill", "commit", "decoder")
# the decoder's soft embeddings read the tied embedding (the head's weight)
HEAD_PATTERNS = ("*soft_embeddings*", "*lm_head*", "*embed_tokens*")
PHASES = ("early", "middle", "late")  # thirds of a canvas's denoising steps
PROMPTS_PER_SAMPLE = 4  # calibration prompts: one per this many --samples


class RecordingSteps(OnnxSteps):
    """``OnnxSteps`` that keeps a seeded reservoir of ``keep`` feeds per graph."""

    def __init__(self, *args, keep: int, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep, self.rng = keep, np.random.default_rng(seed)
        self.kept = {graph: [] for graph in self.sessions}
        self.seen = dict.fromkeys(self.sessions, 0)

    def run(self, graph, feeds):
        self.seen[graph] += 1
        kept = self.kept[graph]
        slot = (len(kept) if len(kept) < self.keep
                else int(self.rng.integers(0, self.seen[graph])))
        if slot < self.keep:
            copied = {name: np.array(value) for name, value in feeds.items()}
            if slot == len(kept):
                kept.append(copied)
            else:
                kept[slot] = copied
        return super().run(graph, feeds)


class PairedSteps:
    """The float ``Steps`` driving generation, the candidate's run in lockstep on the same
    canvases and uniforms, each with its own cache and self-conditioning signal; the
    sampler sees the float's outputs. ``steps`` collects one record per decoder step."""

    def __init__(self, reference: OnnxSteps, candidate: OnnxSteps):
        self.reference, self.candidate = reference, candidate
        self.steps = []
        self.canvas_step = 0

    def __getattr__(self, name):  # batch, capacity, canvas_length, prompt_length, vocab_size
        return getattr(self.reference, name)

    def reset(self, batch):
        self.reference.reset(batch)
        self.candidate.reset(batch)

    def encode(self, ids, start):
        self.reference.encode(ids, start)
        self.candidate.encode(ids, start)
        self.canvas_step = 0

    def denoise(self, canvas, start, temperature, signal, uniform):
        ours, theirs = signal if signal is not None else (None, None)
        a = self.reference.denoise(canvas, start, temperature, ours, uniform)
        b = self.candidate.denoise(canvas, start, temperature, theirs, uniform)
        self.steps.append({"step": self.canvas_step,
                           "argmax": float((a[1] == b[1]).mean()),
                           "sample": float((a[0] == b[0]).mean()),
                           "entropy_float": float(a[2].mean()),
                           "entropy_abs_diff": float(np.abs(a[2] - b[2]).mean())})
        self.canvas_step += 1
        return a[0], a[1], a[2], (a[3], b[3])

    def keep(self, done, old, new):
        if old is None:
            return new
        return (self.reference.keep(done, old[0], new[0]),
                self.candidate.keep(done, old[1], new[1]))


def _prompt_ids(tokenizer, prompts, limit: int) -> list[list[int]]:
    chat = bool(tokenizer.chat_template)
    return [tokenizer.format_prompt(p, chat)[-limit:] for p in prompts]


def _config(generator: GemmaGenerator, ids: list[int]):
    """The artifact's sampler defaults, the generation cut to what the cache holds."""
    from dataclasses import replace

    steps = generator.steps
    fits = (steps.capacity - len(ids)) // steps.canvas_length * steps.canvas_length
    config = generator.config()
    return replace(config, max_new_tokens=min(config.max_new_tokens, fits))


def _generate(generator: GemmaGenerator, ids: list[int], seed: int):
    from dllm_export.runtime.diffusion_gemma import NumpyNoise, generate

    steps = generator.steps
    rows = np.asarray([ids] * steps.batch)  # a batch-B artifact decodes the prompt B times
    return generate(steps, rows, _config(generator, ids), NumpyNoise(steps.vocab_size, seed),
                    generator.eos_ids, generator.pad_id)


def collect_states(artifact_dir: Path, manifest: dict, calib, samples: int, report) -> tuple:
    """(feeds per graph, summary): the float artifact generating from the calibration
    prompts, ``samples`` feeds kept per graph."""
    from dllm_export.calibration.sources import open_source
    from dllm_export.runtime.tokenizer import TextTokenizer

    task_model = trained_on_tasks(manifest["source"]["fingerprint"])
    name, source = open_source(calib, "tasks" if task_model else "generic")
    count = max(1, math.ceil(samples / PROMPTS_PER_SAMPLE))
    prompts = [text.prompt for _, text in zip(range(count), source, strict=False)]
    if not prompts:
        raise DllmExportError(f"--calib {calib}: no calibration prompts in it")
    steps = RecordingSteps(artifact_dir, threads=None, manifest=manifest, keep=samples)
    generator = GemmaGenerator(steps, TextTokenizer(artifact_dir), manifest)
    started = time.perf_counter()
    for i, ids in enumerate(_prompt_ids(generator.tokenizer, prompts, steps.prompt_length)):
        commits = steps.seen["commit"]
        result = _generate(generator, ids, seed=i)
        if steps.seen["commit"] == commits:  # it ended in one canvas: commit that one too,
            canvas = result.sequences[:, len(ids):len(ids) + steps.canvas_length]
            steps.encode(canvas, len(ids))  # as the sampler would before a second
        left = (time.perf_counter() - started) / (i + 1) * (len(prompts) - i - 1)
        report("calibrate", f"prompt {i + 1}/{len(prompts)}: {steps.seen['decoder']} "
                            f"denoising states so far, about {format_seconds(left)} left")
    missing = [graph for graph in GRAPHS if not steps.kept[graph]]
    if "prefill" in missing or "decoder" in missing:
        raise DllmExportError("no calibration states reached the "
                              f"{' and '.join(missing)} graph; pass more --samples")
    summary = {"source": name, "prompts": len(prompts), "seen": dict(steps.seen),
               "kept": {graph: len(feeds) for graph, feeds in steps.kept.items()}}
    return steps.kept, summary


def _token_agreement(a, b) -> tuple[int, int]:
    """(equal, compared) over the longer of two generated rows (a missing token differs)."""
    length = max(len(a), len(b))
    equal = sum(x == y for x, y in zip(a, b, strict=False))
    return equal, length


def run_gemma_gate(artifact_dir: Path, manifest: dict, candidate_dir: Path,
                   candidate_manifest: dict, bars, prompts: int, report) -> dict:
    """The float artifact against the candidate on ``prompts`` held-out task prompts (task
    accuracy is judged for the shipped task-trained model, reported for others)."""
    from dllm_export.eval import tasks
    from dllm_export.runtime.tokenizer import TextTokenizer

    per_task = math.ceil(prompts / len(tasks.TASKS))
    examples = [e for group in zip(*(tasks.held_out_examples(t, per_task) for t in tasks.TASKS),
                                   strict=True) for e in group][:prompts]
    judge_tasks = trained_on_tasks(manifest["source"]["fingerprint"])
    tokenizer = TextTokenizer(artifact_dir)
    reference = OnnxSteps(artifact_dir, threads=None, manifest=manifest)
    candidate = OnnxSteps(candidate_dir, threads=None, manifest=candidate_manifest)
    paired = GemmaGenerator(PairedSteps(reference, candidate), tokenizer, manifest)
    alone = GemmaGenerator(candidate, tokenizer, candidate_manifest)
    equal = compared = 0
    right = {"float": 0, "quantized": 0}
    started = time.perf_counter()
    ids = _prompt_ids(tokenizer, [e.prompt for e in examples], reference.prompt_length)
    for i, (row, example) in enumerate(zip(ids, examples, strict=True)):
        theirs = _generate(paired, row, seed=i)
        ours = _generate(alone, row, seed=i)
        for a, b in zip(theirs.sequences[:, len(row):].tolist(),
                        ours.sequences[:, len(row):].tolist(), strict=True):
            e, c = _token_agreement(a, b)
            equal, compared = equal + e, compared + c
        for key, result in (("float", theirs), ("quantized", ours)):
            answer = takewhile(lambda t: t not in paired.eos_ids,
                               result.sequences[0, len(row):].tolist())
            right[key] += tasks.score(tokenizer.decode(list(answer)), example)
        left = (time.perf_counter() - started) / (i + 1) * (len(ids) - i - 1)
        report("gate", f"prompt {i + 1}/{len(ids)}, about {format_seconds(left)} left")
    records = paired.steps.steps
    by_phase, phases = {}, _phases(records)
    for phase_index, phase in enumerate(PHASES):
        chosen = [r for r, p in zip(records, phases, strict=True) if p == phase_index]
        if chosen:
            by_phase[phase] = {key: float(np.mean([r[key] for r in chosen]))
                               for key in ("argmax", "sample", "entropy_abs_diff")}
    worst_phase, worst = min(((p, v["argmax"]) for p, v in by_phase.items()),
                             key=lambda item: item[1])
    generation = equal / max(compared, 1)
    accuracy = {key: count / len(ids) for key, count in right.items()}
    drop = accuracy["float"] - accuracy["quantized"]
    checks = [
        {"name": "denoising argmax agreement (worst third of the steps)", "value": worst,
         "at": worst_phase, "bar": bars.min_agreement, "passed": worst >= bars.min_agreement},
        {"name": "generation token agreement", "value": generation,
         "bar": bars.min_generation_agreement,
         "passed": generation >= bars.min_generation_agreement},
        {"name": "task accuracy drop", "value": drop, "bar": bars.max_task_drop,
         **accuracy, "judged": judge_tasks,
         "passed": not judge_tasks or drop <= bars.max_task_drop},
    ]
    return {
        "passed": all(c["passed"] for c in checks), "bars": asdict(bars), "checks": checks,
        "evaluation": "ONNX Runtime CPU, the float and the quantised artifact in lockstep",
        "report": {
            "prompts": len(ids), "decoder_steps": len(records), "by_phase": by_phase,
            "sample_agreement": float(np.mean([r["sample"] for r in records])),
            "mean_entropy_float": float(np.mean([r["entropy_float"] for r in records])),
            "entropy_abs_diff": float(np.mean([r["entropy_abs_diff"] for r in records])),
            "generated_tokens_compared": compared,
        },
    }


def _phases(records: list) -> list[int]:
    """Which third of its canvas's denoising steps each record falls in (a canvas's steps
    count up from 0; one that stops early has fewer)."""
    phases, start = [], 0
    for end in range(1, len(records) + 1):
        if end == len(records) or records[end]["step"] == 0:
            steps = end - start
            phases += [min(len(PHASES) - 1, r["step"] * len(PHASES) // steps)
                       for r in records[start:end]]
            start = end
    return phases


def _quantize_graphs(tmp: Path, artifact_dir: Path, manifest: dict, method, options, feeds,
                     report) -> dict:
    """Every graph quantised into ``tmp``, their weights then shared in one file. Returns
    per graph the quantised and excluded node names."""
    import onnx

    from dllm_export.calibration import ort_backend
    from dllm_export.export.shared_weights import WeightsFile

    work = tmp / ".work"
    work.mkdir()
    recipe = Recipe(tuple(options.exclude), options.quantize_router, options.quantize_head,
                    head=HEAD_PATTERNS)
    selected, weights = {}, None
    for graph in GRAPHS:
        spec = manifest["graphs"][graph]
        prepared = work / spec["file"]
        ort_backend.prepare_graph(artifact_dir / spec["file"], prepared)
        selection = select_nodes(onnx.load(str(prepared), load_external_data=False), recipe)
        if not selection.quantize:
            raise DllmExportError(f"--exclude left no linear layer of the {graph} graph to "
                                  "quantise")
        report("quantize", f"{graph} graph: {len(selection.quantize)} linear layers")
        out = tmp / spec["file"]
        if method.format == "qdq":
            ort_backend.int8_qdq(prepared, out, selection.quantize, [], manifest["batch"],
                                 method.backend_method,
                                 reader=ort_backend.FeedsReader(feeds[graph], report))
        else:
            ort_backend.weight_only_nbits(prepared, out, selection.quantize,
                                          4 if method.precision == "int4" else 8,
                                          accuracy_level=options.nbits_accuracy_level,
                                          dequantize_blocks=method.format == "dq")
        if weights is None:
            weights = WeightsFile(out)
        else:
            weights.adopt(out)
        selected[graph] = {"quantized": len(selection.quantize), "excluded": selection.excluded}
    shutil.rmtree(work)
    return selected


def _method(options, profile):
    """ONNX Runtime's quantisers only (ModelOpt's worker takes one canvas graph); INT4 for
    a TensorRT target in DequantizeLinear blocks (``ort-dq``)."""
    library = profile.engine_library if profile else None
    method = options.method or ("ort-dq" if options.precision == "int4"
                                and library not in (None, "onnxruntime") else None)
    method = method_table.resolve_method(options.precision, method, library)
    if method.backend != "onnxruntime" or method.format not in ("qdq", "dq", "nbits"):
        raise DllmExportError(
            f"--method {method.name}: a DiffusionGemma artifact quantises with ONNX Runtime's "
            "Q/DQ (int8: minmax, entropy, percentile), DequantizeLinear blocks (int4: ort-dq) "
            "or MatMulNBits (int4, int8: nbits)")
    return method


def quantize_gemma(artifact_dir, out_dir, options, report=None) -> dict:
    """``quantize_artifact`` for a DiffusionGemma artifact (same options and contract: the
    directory appears complete, marked invalid when the gate fails, which raises)."""
    from dllm_export.calibration.kernels import integer_coverage
    from dllm_export.calibration.quantize import _target, _with_accuracy_level, runs_on

    report = report or (lambda stage, detail="": None)
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    calib_path = Path(options.calib) if options.calib and Path(options.calib).exists() else None
    check_output(out_dir, (artifact_dir, calib_path), options.overwrite)
    source = read_json(artifact_dir / "manifest.json", "the artifact manifest")
    if source.get("valid") is not True or "precision" not in source:
        raise DllmExportError(f"{artifact_dir}: not a validated DiffusionGemma export (exported "
                              "before quantize took DiffusionGemma, or its validation "
                              "failed): export it again")
    if source["precision"] != "fp32" or source.get("quantization"):
        raise DllmExportError(f"{artifact_dir}: precision {source['precision']!r}; quantize "
                              "an fp32 export")
    from dllm_export.integrity import verify_files

    verify_files(artifact_dir, source)
    if source.get("moe") == "sparse":
        raise DllmExportError(f"{artifact_dir}: exported with --moe sparse, whose expert "
                              "weights are gathered at run time where no quantiser reaches "
                              "them; re-export with --moe dense")
    profile = _target(options)
    method = _method(options, profile)
    options = _with_accuracy_level(options, profile)
    bars = DEFAULT_BARS[options.precision].updated(**options.bars)
    feeds, calibration = None, None
    if method.calibrated:
        feeds, calibration = collect_states(artifact_dir, source, options.calib,
                                            options.samples, report)
    manifest = copy.deepcopy(source)
    with atomic_directory(out_dir, overwrite=options.overwrite,
                          inputs=(artifact_dir, calib_path)) as tmp:
        selected = _quantize_graphs(tmp, artifact_dir, source, method, options, feeds, report)
        from dllm_export.runtime.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(artifact_dir, tmp)
        report("kernels", "counting integer kernels in ONNX Runtime's optimised graphs")
        manifest["precision"] = options.precision
        manifest["quantization"] = {
            "method": method.name, "backend": method.backend, "format": method.format,
            "precision": options.precision,
            "accuracy_level": (options.nbits_accuracy_level if method.format == "nbits"
                               else None),
            "source_artifact": {"path": str(artifact_dir.resolve()),
                                "fingerprint": source["source"]["fingerprint"]},
            "graphs": selected,
            "quantized_nodes": sum(g["quantized"] for g in selected.values()),
            "excluded": {name: reason for g in selected.values()
                         for name, reason in g["excluded"].items()},
            "kernels": {graph: integer_coverage(tmp / manifest["graphs"][graph]["file"])
                        for graph in GRAPHS},
            "calibration": calibration,
            "runs_on": runs_on(method, options.precision),
            "target_profile": profile.name if profile else None,
        }
        manifest["quality_gate"] = None
        if options.gate:
            manifest["quality_gate"] = run_gemma_gate(artifact_dir, source, tmp, manifest, bars,
                                                      options.gate_samples, report)
        manifest["valid"] = not options.gate or manifest["quality_gate"]["passed"]
        manifest["files"] = record_files(tmp)
        write_json(tmp / "manifest.json", manifest)
    if not manifest["valid"]:
        failed = [c for c in manifest["quality_gate"]["checks"] if not c["passed"]]
        shown = "; ".join(f"{c['name']} {c['value']:.4f} vs bar {c['bar']}" for c in failed)
        raise DllmExportError(f"{out_dir}: quality gate failed ({shown}); the artifact is "
                              "marked invalid (override a bar if this is acceptable)")
    return manifest
