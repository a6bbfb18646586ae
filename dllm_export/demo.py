"""``dllm-export demo``: the whole pipeline on the shipped default model, on the CPU.

inspect -> export with the cached graphs (validated against PyTorch) -> generate held-out
prompts on ONNX Runtime and PyTorch -> quality of the export against the checkpoint, and
per cache mode -> INT8 quantisation with its quality gate -> a profiling run on the ``cpu``
device profile: each cache mode beside the autoregressive baseline of the same graphs. Each stage calls the same
library function as its CLI verb and prints what a user would look at.
"""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "default-model"
DEMO_SEQ_LEN = 96
DEMO_BLOCK = 16  # the default model decodes 16 positions in one block
# What the profile stage compares: Fast-dLLM threshold decoding, without and with the dual
# cache (docs/default-model.md has the accuracy of each).
DEMO_SAMPLER = {"threshold": 0.5}
STAGES = ("inspect", "export", "generate", "eval", "quantize", "profile")


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


def _eval(model_dir, artifact: Path, console, samples: int):
    from dllm_export.eval.harness import EvalOptions, evaluate
    from dllm_export.eval.report import print_report

    options = EvalOptions(samples=samples, mc_num=16, cache_modes="none,dual",
                          thresholds=str(DEMO_SAMPLER["threshold"]))
    report = evaluate(artifact, other=model_dir, options=options)
    print_report(report, console)
    return report


def _quantize(artifact: Path, out: Path, console, progress):
    """INT8 of the demo's own export: its MoE is in the dense form (the export default), the
    one in which quantisers reach the expert weights (docs/quantization.md)."""
    from dllm_export.calibration.quantize import QuantizeOptions, quantize_artifact
    from dllm_export.calibration.report import print_quantization

    manifest = quantize_artifact(artifact, out, QuantizeOptions(precision="int8", overwrite=True),
                                 report=progress)
    print_quantization(out, manifest, console)


def _profile(artifact: Path, out: Path, console):
    from dllm_export.profiling.report import write_report
    from dllm_export.profiling.runner import ProfileOptions, profile_target

    options = ProfileOptions(profile="cpu", runs=3, warmup=1, threads=1, quality="off",
                             sampler=DEMO_SAMPLER, sweeps=["cache=none,dual"])
    result = profile_target(artifact, options)
    command = (f"dllm-export profile {artifact} --profile cpu --threshold "
               f"{DEMO_SAMPLER['threshold']} --sweep cache=none,dual")
    written = write_report(result, out, command=command)
    console.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in result["headline"].items()))
    ar = result["headline"].get("autoregressive_tokens_per_second")
    for point in (p for p in result["points"] if p["series"] == "cache"):
        rate = point["measured"]["tokens_per_second"]["median"]
        console.print(f"cache {point['value']}: {rate:,.0f} tokens/s"
                      + (f", {rate / ar:.2f}x autoregressive ({ar:,.0f} tokens/s)" if ar else ""))
    console.print(f"report with plots: {written['markdown']}")


def run_demo(out_dir="out/demo", model_dir=DEFAULT_MODEL, samples: int = 10,
             stages=STAGES, console=None, progress=None):
    """Run the pipeline stages in order; ``stages`` picks a subset."""
    from rich.console import Console

    from dllm_export.errors import DllmExportError

    console = console or Console()
    progress = progress or (lambda stage, detail="": None)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise DllmExportError(f"{model_dir}: no checkpoint here (the default model ships in "
                              "dllm_export/data/default-model)")
    artifact = out_dir / "default-onnx"
    timings = {}
    steps = {
        "inspect": ("1. inspect the checkpoint", lambda: _inspect(model_dir, console)),
        "export": ("2. export to ONNX (canvas and cached graphs), validate against PyTorch",
                   lambda: _export(model_dir, artifact, console, progress)),
        "generate": ("3. generate held-out prompts (ONNX Runtime, checked against PyTorch)",
                     lambda: _generate(model_dir, artifact, console, 2)),
        "eval": ("4. quality: the export against the checkpoint",
                 lambda: _eval(model_dir, artifact, console, samples)),
        "quantize": ("5. INT8 quantisation with its quality gate",
                     lambda: _quantize(artifact, out_dir / "default-int8", console, progress)),
        "profile": ("6. profile on the cpu device profile: cache modes, roofline, autoregressive",
                    lambda: _profile(artifact, out_dir / "profile", console)),
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
