"""``dllm-export demo``: the whole pipeline on the shipped default model, on the CPU.

The default model is a ZAYA1-architecture MoE trained here autoregressively
(``data/ar-base``) and converted to diffusion by TiDAR-style continued training
(``data/default-model``, docs/default-model.md). The demo runs: inspect -> export both
models (validated against PyTorch) -> generate held-out prompts on ONNX Runtime, checked
against PyTorch -> the headline: every decoding mode of the converted model beside its
autoregressive base, accuracy and speed side by side in one interleaved run -> INT8
quantisation with its quality gate -> a profiling run on the ``cpu`` device profile. A
masked-diffusion checkpoint (``--model dllm_export/data/llada-moe-tasks``) gets its cache
modes compared instead. Each stage calls the same library function as its CLI verb and
prints what a user would look at.
"""

from __future__ import annotations

import time
from pathlib import Path

from dllm_export.shipped import AR_BASE, DEFAULT_MODEL

DEMO_SEQ_LEN = 96
DEMO_BLOCK = 16  # the shipped models decode 16 positions in one block
# What a masked-diffusion model's profile compares: Fast-dLLM threshold decoding, without
# and with the dual cache (docs/default-model.md has the accuracy of each).
DEMO_SAMPLER = {"threshold": 0.5}
DEMO_MODES = ("autoregressive", "block", "lossless", "logit-mix")  # runtime/tidar.py
DEMO_THREADS = 1  # the headline is measured on one thread per backend
STAGES = ("inspect", "export", "generate", "eval", "quantize", "profile")


def _is_draft_and_verify(model_dir) -> bool:
    from dllm_export.checkpoint import open_checkpoint
    from dllm_export.runtime.api import sampler_defaults

    checkpoint = open_checkpoint(model_dir)
    return sampler_defaults(checkpoint.family,
                            checkpoint.generation_config).algorithm == "tidar"


def _stage(console, title: str):
    console.rule(f"[bold cyan]{title}")
    return time.perf_counter()


def _inspect(model_dir, console):
    from dllm_export.inspect import inspect_checkpoint

    info = inspect_checkpoint(model_dir)
    console.print(f"{info['family']}, {info['parameters']:,} parameters "
                  f"({info['active_parameters_per_token']:,} active per token), "
                  f"experts {info.get('experts')}, checkpoint {info['checkpoint_dtype']}")


def _export(model_dir, out: Path, console, progress):
    from dllm_export.export.onnx import ExportOptions, export_model

    options = ExportOptions(seq_len=DEMO_SEQ_LEN, overwrite=True, cache=True,
                            block_length=DEMO_BLOCK, window=DEMO_BLOCK)
    manifest = export_model(model_dir, out, options, report=progress)
    worst = max(manifest["validation"]["results"], key=lambda r: r["logprob_diff"])
    console.print(f"{out}: valid={manifest['valid']}, {len(manifest['validation']['results'])} "
                  f"cases; largest log-probability difference {worst['logprob_diff']:.2g} "
                  f"({worst['case']}), top-1 agreement {worst['top1_agreement']:.4f}; "
                  f"TensorRT lint clean={manifest['trt_compatibility']['clean']}")


def _generate(model_dir, artifact: Path, console, count: int):
    from rich.table import Table

    from dllm_export.eval import tasks
    from dllm_export.runtime import Generator

    onnx = Generator.from_artifact(artifact)
    torch = Generator.from_checkpoint(model_dir)
    table = Table("task", "prompt", "expected", "ONNX Runtime", "same as PyTorch")
    examples = [e for task in tasks.TASKS for e in tasks.held_out_examples(task, count, seed=7)]
    for example in examples:
        out = onnx.generate(example.prompt, chat=True)
        reference = torch.generate(example.prompt, chat=True)
        table.add_row(example.task, example.prompt, example.answer, out.texts[0],
                      "yes" if out.tokens == reference.tokens else "NO")
    console.print(table)
    console.print(" ".join(f"{k}={v}" for k, v in out.stats().items()), style="dim")


def _eval(model_dir, artifact: Path, console, samples: int, base_artifact=None):
    """A draft-and-verify model: each decoding mode beside the autoregressive base (the
    headline). A masked-diffusion model: the export against the checkpoint, per cache
    mode."""
    from dllm_export.eval.harness import EvalOptions, evaluate
    from dllm_export.eval.report import print_report
    from dllm_export.jsonio import write_json

    if base_artifact is None:
        options = EvalOptions(samples=samples, mc_num=16, cache_modes="none,dual",
                              thresholds=str(DEMO_SAMPLER["threshold"]))
        report = evaluate(artifact, other=model_dir, options=options)
    else:
        options = EvalOptions(samples=samples, mc_num=0, ratios="0.5", threads=DEMO_THREADS,
                              samplers=",".join(DEMO_MODES))
        report = evaluate(artifact, other=base_artifact, options=options)
        console.print(f"dllm-export eval {artifact} --compare {base_artifact} --samples "
                      f"{samples} --mc-num 0 --ratios 0.5 --threads {DEMO_THREADS} "
                      f"--samplers {','.join(DEMO_MODES)}", style="dim")
    print_report(report, console)
    write_json(artifact.parent / "eval.json", report)
    return report


def _quantize(artifact: Path, out: Path, console, progress):
    """INT8 of the demo's own export: its MoE is in the dense form (the export default), the
    one in which quantisers reach the expert weights (docs/quantization.md)."""
    from dllm_export.calibration.quantize import QuantizeOptions, quantize_artifact
    from dllm_export.calibration.report import print_quantization

    manifest = quantize_artifact(artifact, out, QuantizeOptions(precision="int8", overwrite=True),
                                 report=progress)
    print_quantization(out, manifest, console)


def _profile(artifact: Path, out: Path, console, draft_and_verify: bool):
    from dllm_export.profiling.report import write_report
    from dllm_export.profiling.runner import ProfileOptions, profile_target

    if draft_and_verify:
        sampler, sweep = {}, "tidar_sampler=" + ",".join(DEMO_MODES[1:])
    else:
        sampler, sweep = DEMO_SAMPLER, "cache=none,dual"
    options = ProfileOptions(profile="cpu", runs=3, warmup=1, threads=DEMO_THREADS,
                             quality="off", sampler=sampler, sweeps=[sweep])
    result = profile_target(artifact, options)
    command = (f"dllm-export profile {artifact} --profile cpu --threads {DEMO_THREADS} "
               + "".join(f"--{k} {v} " for k, v in sampler.items()) + f"--sweep {sweep}")
    written = write_report(result, out, command=command)
    console.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in result["headline"].items()))
    ar = result["headline"].get("autoregressive_tokens_per_second")
    series = sweep.partition("=")[0]
    for point in (p for p in result["points"] if p["series"] == series):
        rate = point["measured"]["tokens_per_second"]["median"]
        console.print(f"{series} {point['value']}: {rate:,.0f} tokens/s"
                      + (f", {rate / ar:.2f}x autoregressive ({ar:,.0f} tokens/s)" if ar else ""))
    console.print(f"report with plots: {written['markdown']}")


def run_demo(out_dir="out/demo", model_dir=DEFAULT_MODEL, samples: int = 10,
             stages=STAGES, console=None, progress=None, base_dir=None):
    """Run the pipeline stages in order; ``stages`` picks a subset. A draft-and-verify
    model is compared with ``base_dir`` (default: the shipped autoregressive base when
    ``model_dir`` is the default model)."""
    from rich.console import Console

    from dllm_export.errors import DllmExportError

    console = console or Console()
    progress = progress or (lambda stage, detail="": None)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    for name, directory in (("--model", model_dir), ("--base", base_dir)):
        if directory is not None and not (Path(directory) / "config.json").is_file():
            raise DllmExportError(f"{name} {directory}: no checkpoint here (the default model "
                                  "ships in dllm_export/data/default-model)")
    draft_and_verify = _is_draft_and_verify(model_dir)
    if draft_and_verify and base_dir is None and model_dir.resolve() == DEFAULT_MODEL.resolve():
        base_dir = AR_BASE
    artifact = out_dir / "default-onnx"
    base_artifact = out_dir / "base-onnx" if draft_and_verify and base_dir else None

    def export():
        _export(model_dir, artifact, console, progress)
        if base_artifact is not None:
            _export(Path(base_dir), base_artifact, console, progress)

    timings = {}
    steps = {
        "inspect": ("1. inspect the checkpoint", lambda: _inspect(model_dir, console)),
        "export": ("2. export to ONNX (canvas and cached graphs), validate against PyTorch",
                   export),
        "generate": ("3. generate held-out prompts (ONNX Runtime, checked against PyTorch)",
                     lambda: _generate(model_dir, artifact, console, 2)),
        "eval": ("4. quality and speed: " + ("every decoding mode beside the autoregressive "
                                             "base" if base_artifact else
                                             "the export against the checkpoint"),
                 lambda: _eval(model_dir, artifact, console, samples, base_artifact)),
        "quantize": ("5. INT8 quantisation with its quality gate",
                     lambda: _quantize(artifact, out_dir / "default-int8", console, progress)),
        "profile": ("6. profile on the cpu device profile: "
                    + ("decoding modes" if draft_and_verify else "cache modes")
                    + ", roofline, autoregressive",
                    lambda: _profile(artifact, out_dir / "profile", console, draft_and_verify)),
    }
    for name in stages:
        title, action = steps[name]
        progress(name, "")
        started = _stage(console, title)
        action()
        timings[name] = round(time.perf_counter() - started, 1)
    progress("done", "")
    console.rule("[bold green]done")
    console.print(f"stage seconds: {timings}; outputs in {out_dir}")
    return timings
