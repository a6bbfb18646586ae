"""``dllm-export``: one click group, one thin command per pipeline stage.

Each command parses its options and calls one library function; heavy imports happen
inside the command. ``DllmExportError`` is printed as one line and exits with status 1.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from dllm_export.errors import DllmExportError
from dllm_export.families import NAMES as FAMILY_NAMES


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def user_errors(func):
    """Turn DllmExportError into one red line and exit status 1; other errors keep traces."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DllmExportError as err:
            _console().print(f"[bold red]error:[/] {err}", soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            _console().print("[yellow]interrupted[/]")
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dllm-export")
def main():
    """Masked-diffusion language models to ONNX and TensorRT, and a thin runtime."""


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def inspect(model_dir, as_json):
    """Family, parameters, experts, special tokens and weight bytes of a checkpoint."""
    from dllm_export.inspect import inspect_checkpoint

    info = inspect_checkpoint(model_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        table.add_row(f"[bold]{key}[/]", str(value))
    from rich.console import Console

    Console().print(table)


@main.command("make-tiny")
@click.argument("out_dir", type=click.Path())
@click.option("--family", required=True, type=click.Choice(list(FAMILY_NAMES)))
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True,
              type=click.Choice(["bfloat16", "float16", "float32"]))
@click.option("--shards", default=2, show_default=True, help="Safetensors shards (1: no index).")
@click.option("--overwrite", is_flag=True)
@user_errors
def make_tiny(out_dir, family, seed, dtype, shards, overwrite):
    """Write a tiny random checkpoint in the family's real format."""
    from dllm_export.models.tiny import make_tiny as write

    path = write(family, out_dir, seed=seed, dtype=dtype, shards=shards, overwrite=overwrite)
    click.echo(str(path))


def sampler_options(func):
    """Sampler flags shared by generate, run, eval and profile (None: model default)."""
    options = [
        click.option("--algorithm", type=click.Choice(["llada", "dream", "llada2", "tidar"]),
                     default=None, help="Unmasking loop (default: the family's own; tidar: "
                                        "draft-and-verify for families with a next-token mode)."),
        click.option("--gen-length", type=int, default=None, help="Tokens to generate."),
        click.option("--steps", type=int, default=None, help="Denoising steps in total."),
        click.option("--block-length", type=int, default=None,
                     help="Semi-autoregressive block length (llada)."),
        click.option("--remasking", type=click.Choice(["low_confidence", "random"]), default=None),
        click.option("--threshold", type=float, default=None,
                     help="Confidence-threshold parallel decoding (Fast-dLLM)."),
        click.option("--alg", type=click.Choice(["origin", "maskgit_plus", "topk_margin", "entropy"]),
                     default=None, help="Dream's confidence rule."),
        click.option("--alg-temp", type=float, default=None),
        click.option("--temperature", type=float, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--top-k", type=int, default=None),
        click.option("--cfg-scale", type=float, default=None,
                     help="Unsupervised classifier-free guidance (needs full logits)."),
        click.option("--logits-eos-inf", is_flag=True, default=None),
        click.option("--confidence-eos-eot-inf", is_flag=True, default=None),
        click.option("--seed", type=int, default=None),
        click.option("--no-early-exit", "early_exit", flag_value=False, default=None,
                     help="Keep denoising after the answer has ended with EOS."),
        click.option("--cache", type=click.Choice(["none", "prefix", "dual", "block"]),
                     default=None,
                     help="Key/value cache: none (full canvas), prefix / dual (Fast-dLLM, "
                          "approximate), block (exact for block-causal models). Default: the "
                          "family's exact one."),
        click.option("--attention", type=click.Choice(["bidirectional", "block_causal"]),
                     default=None, help="Attention rule (default: the family's; block_causal "
                                        "with --cache block)."),
        click.option("--editing-threshold", type=float, default=None,
                     help="llada2: LLaDA2.1's token editing (re-edit committed tokens whose "
                          "new prediction is this confident)."),
        click.option("--max-post-steps", type=int, default=None,
                     help="llada2 with editing: forwards that keep editing a full block."),
        click.option("--minimal-topk", type=int, default=None, help="llada2: LLaDA2.0's cap."),
        click.option("--eos-early-stop", is_flag=True, default=None,
                     help="llada2: stop a row as soon as its answer has ended."),
        click.option("--tidar-sampler",
                     type=click.Choice(["lossless", "logit-mix", "block", "autoregressive"]),
                     default=None, help="tidar: accept drafts the autoregressive predictions "
                                        "confirm (lossless), or blend both (logit-mix); or "
                                        "the same model's block diffusion over the exact "
                                        "cache (block, with --threshold, default 0.9) or "
                                        "one token per forward (autoregressive)."),
        click.option("--mix", type=float, default=None,
                     help="tidar logit-mix: the draft's weight, 0 (lossless) to 1."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


SAMPLER_KEYS = ("algorithm", "gen_length", "steps", "block_length", "remasking", "threshold",
                "alg", "alg_temp", "temperature", "top_p", "top_k", "cfg_scale",
                "logits_eos_inf", "confidence_eos_eot_inf", "seed", "early_exit", "cache",
                "attention", "editing_threshold", "max_post_steps", "minimal_topk",
                "eos_early_stop", "tidar_sampler", "mix")


def _sampler_overrides(kwargs) -> dict:
    return {key: kwargs.pop(key) for key in SAMPLER_KEYS if kwargs.get(key) is not None}


def _print_generation(generator, prompt, chat, show_steps, truncate, overrides):
    """Stream text as it commits (or the canvas per step), then the statistics."""
    from dllm_export.runtime.display import CanvasView

    view = CanvasView(generator, overrides.get("gen_length") or generator.defaults.gen_length) if show_steps else None
    on_text = None if show_steps else (lambda text: click.echo(text, nl=False))
    out = generator.generate(prompt, chat=chat, on_text=on_text, on_step=view,
                             truncate=truncate, **overrides)
    if view:
        view.close()
        click.echo(out.texts[0])
    else:
        click.echo()
    _console().print(" ".join(f"{k}={v}" for k, v in out.stats().items()), style="dim")
    return out


def prompt_options(func):
    """Prompt flags shared by generate and run."""
    options = [
        click.option("--prompt", required=True, help="Prompt text."),
        click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template."),
        click.option("--show-steps", is_flag=True, help="Show the canvas filling in step by step."),
        click.option("--truncate", is_flag=True, help="Left-truncate a prompt that does not fit."),
    ]
    for option in reversed(options):
        func = option(func)
    return sampler_options(func)


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("--moe", type=click.Choice(["eager", "dense", "sparse", "ort"]), default=None,
              help="How MoE layers run in PyTorch (default: eager).")
@click.option("--device", default="cpu", show_default=True)
@prompt_options
@user_errors
def generate(model_dir, prompt, chat, moe, device, show_steps, truncate, **kwargs):
    """Generate with the PyTorch reference backend, straight from a checkpoint."""
    from dllm_export.runtime import Generator

    overrides = _sampler_overrides(kwargs)
    generator = Generator.from_checkpoint(model_dir, device=device, moe=moe)
    _print_generation(generator, prompt, chat, show_steps, truncate, overrides)


class _StageProgress:
    """A one-line spinner that names the current stage and its detail (for long work)."""

    def __init__(self):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[stage]}[/]"),
                                 TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=_console(), transient=False)
        self.task = None

    def __enter__(self):
        self.progress.start()
        self.task = self.progress.add_task("", stage="start")
        return self

    def __call__(self, stage: str, detail: str = ""):
        self.progress.update(self.task, stage=stage, description=detail)

    def __exit__(self, *exc):
        self.progress.stop()


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Artifact directory.")
@click.option("--seq-len", default=256, show_default=True, help="Fixed canvas length (prompt + generation).")
@click.option("--batch", default=1, show_default=True, help="Fixed batch size.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option("--moe", default="auto", show_default=True,
              type=click.Choice(["auto", "dense", "sparse", "ort"]),
              help="MoE form in the graph: dense (all experts; TensorRT and every quantiser), "
                   "sparse (routed rows only, lossless expert blocks), ort "
                   "(com.microsoft::MoE: fastest on ONNX Runtime, no TensorRT); auto: ort for "
                   "--target onnxruntime where the op can compute the experts (SwiGLU, no "
                   "expert bias), else and for tensorrt dense up to 16 experts and sparse "
                   "beyond (dense in graphs of up to 32 rows).")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="Where the graphs will run: picks the attention form "
                                      "of --attention auto and the MoE form of --moe "
                                      "auto.")
@click.option("--attention", default="auto", show_default=True,
              type=click.Choice(["auto", "mha", "onnx", "decomposed"]),
              help="Attention in the graph: mha (com.microsoft::MultiHeadAttention, ONNX "
                   "Runtime's fused kernel), onnx (the standard Attention op, --opset 23: "
                   "TensorRT 10.14+ IAttention and ONNX Runtime), decomposed (MatMul / "
                   "Softmax / MatMul, which TensorRT fuses at any opset); auto: mha for "
                   "--target onnxruntime, for tensorrt onnx at --opset 23+ else decomposed. "
                   "mha and onnx fuse RoPE too (RotaryEmbedding: the standard op at --opset "
                   "23+, else com.microsoft's).")
@click.option("--moe-block", type=int, default=None,
              help="Rows per expert block (sparse; default: about the routed rows per expert "
                   "of each graph).")
@click.option("--outputs", default="decode", show_default=True, type=click.Choice(["decode", "logits"]))
@click.option("--topk", default=8, show_default=True, help="Candidates per position in the decode head.")
@click.option("--opset", default=18, show_default=True)
@click.option("--cache/--no-cache", default=None,
              help="Also export the cached graphs (prefill, step, window, decode) for "
                   "run --cache prefix|dual|block and the autoregressive baseline "
                   "(default: on for block-causal families such as LLaDA2, which only "
                   "they decode; implied by --block-length / --window).")
@click.option("--block-length", type=int, default=None,
              help="Query rows of the step graph (default: the sampler's block length).")
@click.option("--window", type=int, default=None,
              help="Rows of the prefix-cache window graph (default: the sampler's gen length).")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check.")
@click.option("--overwrite", is_flag=True)
@user_errors
def export(model_dir, out_dir, seq_len, batch, dtype, moe, target, attention, moe_block,
           outputs, topk, opset, cache, block_length, window, no_validate, overwrite):
    """Export a checkpoint to a validated ONNX artifact."""
    from dllm_export.export.onnx import ExportOptions, export_model

    if _family_of(model_dir) == "diffusion-gemma":  # its own graphs: export/diffusion_gemma.py
        from dllm_export.export.diffusion_gemma import export_cli

        export_cli(model_dir, out_dir, seq_len, batch, dtype, moe, opset,
                   validate=not no_validate, overwrite=overwrite)
        return

    options = ExportOptions(seq_len=seq_len, batch=batch, dtype=dtype, moe=moe, moe_block=moe_block,
                            outputs=outputs, topk=topk, opset=opset, validate=not no_validate,
                            overwrite=overwrite, cache=cache, block_length=block_length,
                            window=window, target=target, attention=attention)
    with _StageProgress() as progress:
        manifest = export_model(model_dir, out_dir, options, report=progress)
    _print_export_summary(out_dir, manifest)


def _family_of(model_dir) -> str | None:
    from pathlib import Path

    from dllm_export.checkpoint import read_config

    try:
        return read_config(Path(model_dir))[1]
    except DllmExportError:
        return None  # export_model says what is wrong with the directory


def _print_export_summary(out_dir, manifest):
    from rich.console import Console
    from rich.table import Table

    console = Console()
    validation = manifest["validation"] or {}
    if validation.get("results"):
        table = Table(title=f"validation: {validation['reference']} vs ONNX Runtime CPU "
                            f"(bars {validation['bars']})")
        columns = ("case", "positions", "top1_agreement_ties", "logprob_diff", "cosine_mean",
                   "failed")
        for column in columns:
            table.add_column(column.replace("_agreement_ties", " (ties)"))
        for row in validation["results"]:
            table.add_row(*(f"{row[c]:.6g}" if isinstance(row.get(c), float)
                            else ("; ".join(row[c]) or "-") if c == "failed" else str(row[c])
                            for c in columns))
        console.print(table)
    moe = manifest.get("moe") or {}
    if moe.get("strategy"):  # which MoE form --moe picked, per graph
        forms = ", ".join(f"{name} {graph['form']}" for name, graph in
                          (moe.get("graphs") or {}).items())
        console.print(f"MoE: {moe.get('experts')} experts top-{moe.get('top_k')}, --moe "
                      f"{moe.get('requested')} for {moe.get('target')} -> {moe['strategy']}"
                      + (f" ({forms})" if forms else "")
                      + (f"; not ort: {moe['ort_refusal']}" if moe.get("ort_refusal") else ""))
    trt = manifest.get("trt_compatibility") or {}
    console.print(f"TensorRT compatibility: {'clean' if trt.get('clean') else 'see check-trt'}"
                  f" ({len(trt.get('findings', []))} findings)")
    console.print(f"[bold green]{out_dir}[/] valid={manifest['valid']}")


@main.command()
@click.argument("artifact_dir", type=click.Path())
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Checkpoint to compare with (default: the manifest's source).")
@user_errors
def validate(artifact_dir, model_dir):
    """Rerun ONNX Runtime vs PyTorch validation of an artifact."""
    from dllm_export.export.onnx import validate_artifact

    with _StageProgress() as progress:
        manifest = validate_artifact(artifact_dir, model_dir, report=progress)
    if manifest["family"] == "diffusion-gemma":
        from dllm_export.export import diffusion_gemma

        if not manifest["valid"]:
            raise DllmExportError(
                f"{artifact_dir}: {diffusion_gemma.validation_failure(manifest['validation'])}")
        print(diffusion_gemma.validation_summary(manifest["validation"]))
        return
    _print_export_summary(artifact_dir, manifest)
    if not manifest["valid"]:
        from dllm_export.export.onnx import validation_failure

        raise DllmExportError(f"{artifact_dir}: {validation_failure(manifest['validation'])}")


@main.command("check-trt")
@click.argument("onnx_path", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@user_errors
def check_trt(onnx_path, as_json):
    """List every node TensorRT's ONNX parser would reject, with the reason."""
    from pathlib import Path

    from dllm_export.export.trt_lint import check_trt as lint

    path = Path(onnx_path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise DllmExportError(f"{path}: no such ONNX file")
    findings = lint(path)
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for f in findings:
            click.echo(f"{f.severity:7} {f.op:24} {f.node}: {f.reason}")
    errors = sum(f.severity == "error" for f in findings)
    click.echo(f"{path}: {errors} errors, {len(findings) - errors} warnings", err=True)
    if errors:
        sys.exit(1)


@main.command()
@click.argument("artifact_dir", type=click.Path())
@click.option("--provider", default="cpu", show_default=True,
              type=click.Choice(["cpu", "cuda", "tensorrt"]), help="ONNX Runtime provider.")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: all cores).")
@click.option("--memory", default="fast", show_default=True, type=click.Choice(["fast", "lean"]),
              help="ONNX Runtime weights: a pre-packed copy per graph (fast), or one shared "
                   "memory-mapped copy (lean: least memory, slower cached steps).")
@prompt_options
@user_errors
def run(artifact_dir, prompt, chat, provider, threads, memory, show_steps, truncate, **kwargs):
    """Generate from an exported artifact or engine (no torch needed)."""
    from dllm_export.runtime import Generator

    overrides = _sampler_overrides(kwargs)
    generator = Generator.from_artifact(artifact_dir, provider=provider, threads=threads,
                                        memory=memory)
    _print_generation(generator, prompt, chat, show_steps, truncate, overrides)



@main.command()
@click.argument("source", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-batch", type=int, default=None,
              help="Requests per denoise call (default: the artifact's fixed batch).")
@click.option("--max-queue", default=64, show_default=True, type=int,
              help="Waiting requests before new ones get 429.")
@click.option("--timeout", default=120.0, show_default=True, type=float,
              help="Seconds from arrival after which a request is cancelled (504).")
@click.option("--batch-wait", default=0.01, show_default=True, type=float,
              help="Seconds a batch that is not full waits for more requests.")
@click.option("--model-name", default=None, help="The model id clients send (default: the "
                                                 "directory's name).")
@click.option("--provider", default="cpu", show_default=True,
              type=click.Choice(["cpu", "cuda", "tensorrt"]), help="ONNX Runtime provider.")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: all cores).")
@user_errors
def serve(source, host, port, max_batch, max_queue, timeout, batch_wait, model_name, provider,
          threads):
    """An OpenAI-compatible server over an artifact, engine or checkpoint (extra: serve)."""
    try:
        from dllm_export.serve.app import serve as run_server
    except ImportError as err:
        raise DllmExportError(f"dllm-export serve needs the serve extra ({err.name} is "
                              "missing): pip install 'dllm-export[serve]'") from None
    run_server(source, host, port, max_batch, max_queue, timeout, batch_wait, model_name,
               provider, threads)


@main.command()
@click.argument("source", type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="Model repository directory (the model goes in a folder inside it).")
@click.option("--name", default=None, help="Model name (default: the source directory's name).")
@click.option("--instances", default=1, show_default=True, type=int,
              help="Model instances (instance_group count).")
@click.option("--max-queue-delay-us", default=10000, show_default=True, type=int,
              help="Dynamic batching: how long a request waits for others.")
@click.option("--provider", default="cpu", show_default=True,
              type=click.Choice(["cpu", "cuda", "tensorrt"]), help="ONNX Runtime provider.")
@click.option("--threads", type=int, default=None, help="Intra-op threads per instance.")
@click.option("--overwrite", is_flag=True)
@user_errors
def triton(source, out_dir, name, instances, max_queue_delay_us, provider, threads, overwrite):
    """A Triton Inference Server model repository (Python backend, decoupled streaming)."""
    from dllm_export.serve.triton import write_repository

    model = write_repository(source, out_dir, name, instances, max_queue_delay_us, provider,
                             threads, overwrite)
    click.echo(str(model))

@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
@user_errors
def profiles(ctx, as_json):
    """List the shipped device profiles (or: profiles show NAME)."""
    if ctx.invoked_subcommand is not None:
        return
    from dllm_export.device_profiles import all_profiles

    found = all_profiles()
    if as_json:
        click.echo(json.dumps([{"name": p.name, "description": p.description,
                                "engine_library": p.engine_library, "path": str(p.path)}
                               for p in found], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("library", no_wrap=True)
    for column in ("CC", "usable/GiB", "GB/s", "precisions"):
        table.add_column(column)
    for p in found:
        cc = ".".join(map(str, p.compute_capability)) if p.compute_capability else "-"
        table.add_row(p.name, p.engine_library, cc,
                      f"{p.usable_bytes / (1 << 30):.1f}/{p.memory_gib:g}",
                      f"{p.bandwidth_gbs:g}", " ".join(p.precisions))
    Console().print(table)


@profiles.command("show")
@click.argument("name")
@user_errors
def profiles_show(name):
    """Print one profile file (a shipped name or a path), with its sources."""
    from dllm_export.device_profiles import load_profile

    profile = load_profile(name)
    click.echo(f"# {profile.path}")
    click.echo(profile.path.read_text(encoding="utf-8"), nl=False)


@main.command()
@click.argument("source", type=click.Path())
@click.option("--profile", "profile_name", required=True,
              help="Device profile name (dllm-export profiles) or a .yaml path.")
@click.option("--precision", default=None, help="Engine precision (default: the artifact's, "
              "or the profile's build precision).")
@click.option("--seq-len", type=int, default=None, help="Canvas length (config only).")
@click.option("--batch", type=int, default=None, help="Batch (config only).")
@click.option("--cache", is_flag=True,
              help="Count the cached graphs' key/value cache (as export --cache makes).")
@click.option("--block-length", type=int, default=None,
              help="Rows of the cached step whose roofline is shown (default 32).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def plan(source, profile_name, precision, seq_len, batch, cache, block_length, as_json):
    """Will a checkpoint (config.json is enough) or an artifact fit a device?"""
    from dllm_export.device_profiles import load_profile
    from dllm_export.export.plan import plan_model, render_plan

    result = plan_model(source, load_profile(profile_name), precision=precision,
                        seq_len=seq_len, batch=batch, cache=cache, block_length=block_length)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        from rich.console import Console

        render_plan(result, Console(highlight=False))


@main.command()
@click.argument("artifact_dir", type=click.Path())
@click.option("--profile", "profile_name", required=True,
              help="Device profile of this machine's GPU (name or .yaml path).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="Engine directory to write.")
@click.option("--precision", default=None,
              help="fp16/bf16 for an fp32 artifact (default: the profile's); fixed otherwise.")
@click.option("--via", type=click.Choice(["tensorrt", "ort-trt"]), default="tensorrt",
              show_default=True, help="TensorRT's builder, or ONNX Runtime's TensorRT provider.")
@click.option("--weight-streaming", is_flag=True,
              help="Let weights that do not fit stay in host memory (discrete GPUs).")
@click.option("--refittable", is_flag=True, help="Build an engine whose weights can be refit.")
@click.option("--timing-cache", type=click.Path(), default=None,
              help="Timing cache file (default: per GPU and TensorRT version in ~/.cache).")
@click.option("--no-cache", "no_cache", is_flag=True,
              help="Build the canvas engine only, not the cached graphs' engines.")
@click.option("--overwrite", is_flag=True)
@user_errors
def build(artifact_dir, profile_name, out_dir, precision, via, weight_streaming, refittable,
          timing_cache, no_cache, overwrite):
    """Build a TensorRT engine for this machine's GPU from an ONNX artifact."""
    from pathlib import Path

    from dllm_export.device_profiles import load_profile
    from dllm_export.export.build import BuildOptions, build_engine
    from dllm_export.export.build_progress import ConsoleBuildProgress

    options = BuildOptions(precision=precision, via=via, weight_streaming=weight_streaming,
                           refittable=refittable, overwrite=overwrite, cache=not no_cache,
                           timing_cache=Path(timing_cache) if timing_cache else None)
    profile = load_profile(profile_name)
    with ConsoleBuildProgress(_console()) as progress:
        manifest = build_engine(artifact_dir, profile, out_dir, options, report=progress)
    done = manifest.get("build") or manifest.get("ort_tensorrt", {})
    stats = {key: done[key] for key in ("seconds", "build_seconds", "peak_host_bytes",
                                        "peak_device_bytes", "engine_bytes") if key in done}
    click.echo(out_dir)
    _console().print(" ".join(f"{k}={v}" for k, v in stats.items()), style="dim")
    if done.get("precision_from"):
        _console().print(f"precision from: {done['precision_from']}", style="dim")


@main.command("profile")
@click.argument("target", required=False, type=click.Path())
@click.option("--profile", "profile_name", default=None,
              help="Device profile name (dllm-export profiles) or a .yaml path.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None,
              help="Default: what TARGET runs on (checkpoint: torch, artifact: onnxruntime, "
                   "engine: tensorrt).")
@click.option("--prompts", "prompts_file", type=click.Path(), default=None,
              help="One prompt per line (or .jsonl with a \"prompt\" field).")
@click.option("--chat/--no-chat", default=True, show_default=True)
@click.option("--sweep", "sweeps", multiple=True, help="KEY=V1,V2,... for threshold, "
              "block_length, steps, gen_length, cache (none,prefix,dual,block), tidar_sampler "
              "(autoregressive,block,lossless,logit-mix), seq_len or precision (repeatable).")
@click.option("--runs", default=5, show_default=True, help="Timed generations per point.")
@click.option("--warmup", default=1, show_default=True, help="Untimed generations first.")
@click.option("--rounds", default=1, show_default=True,
              help="Measure every point this many times, interleaved, each in a fresh "
                   "process; the quietest round is kept (a shared machine's noise).")
@click.option("--threads", type=int, default=None, help="CPU threads (torch and ONNX Runtime).")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option("--provider", default="cpu", show_default=True,
              type=click.Choice(["cpu", "cuda", "tensorrt"]), help="ONNX Runtime provider.")
@click.option("--dtype", default="fp32", show_default=True,
              type=click.Choice(["fp32", "bf16", "fp16"]), help="torch weights.")
@click.option("--seq-len", type=int, default=None,
              help="torch: a fixed canvas; checkpoint on onnxruntime: the export length.")
@click.option("--moe", type=click.Choice(["dense", "sparse", "ort"]), default=None,
              help="MoE strategy of artifacts profile exports (default: the export default, dense).")
@click.option("--no-autoregressive", is_flag=True, help="Skip the autoregressive baseline.")
@click.option("--quality", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, help="Task accuracy per point (auto: on the default model).")
@click.option("--quality-examples", default=20, show_default=True, help="Per task.")
@click.option("--in-process", is_flag=True, help="Measure here instead of a process per job.")
@click.option("--cache-dir", type=click.Path(), default=None,
              help="Artifacts profile exports (default: ~/.cache/dllm-export/profile).")
@click.option("--compare", "compare_dirs", multiple=True, type=click.Path(),
              help="Report directories to put side by side (no TARGET then).")
@click.option("-o", "--out", "out_dir", type=click.Path(), default=None,
              help="Report directory (default: profile-TARGET-PROFILE).")
@click.option("--json", "as_json", is_flag=True, help="Print the headline as JSON.")
@sampler_options
@user_errors
def profile_command(target, profile_name, backend, prompts_file, chat, sweeps, runs, warmup,
                    rounds, threads, device, provider, dtype, seq_len, moe, no_autoregressive,
                    quality, quality_examples, in_process, cache_dir, compare_dirs, out_dir,
                    as_json, **kwargs):
    """Measure latency, tokens/s and memory against the roofline and autoregressive decoding."""
    import shlex
    from pathlib import Path

    from dllm_export.profiling.report import compare_reports, write_report

    if compare_dirs:
        if target or profile_name:
            raise DllmExportError("--compare takes report directories only (no TARGET, no "
                                  "--profile)")
        written = compare_reports(list(compare_dirs), out_dir or "profile-compare")
        click.echo(str(written["markdown"]))
        return
    if not target or not profile_name:
        raise DllmExportError("profile needs TARGET and --profile (or --compare DIR DIR ...)")
    from dllm_export.profiling.progress import ProfileProgress
    from dllm_export.profiling.runner import (
        ProfileOptions,
        profile_target,
        read_prompts,
    )

    options = ProfileOptions(
        profile=profile_name, backend=backend, sampler=_sampler_overrides(kwargs),
        prompts=read_prompts(prompts_file) if prompts_file else None, chat=chat,
        sweeps=list(sweeps), warmup=warmup, runs=runs, rounds=rounds, threads=threads,
        device=device, provider=provider, dtype=dtype, seq_len=seq_len, moe=moe,
        autoregressive=not no_autoregressive, quality=quality,
        quality_examples=quality_examples, isolate=not in_process,
        **({"cache_dir": Path(cache_dir)} if cache_dir else {}))
    with ProfileProgress(_console()) as progress:
        result = profile_target(target, options, report=progress)
    out_dir = out_dir or f"profile-{Path(target).resolve().name}-{Path(profile_name).stem}"
    command = "dllm-export " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    written = write_report(result, out_dir, command=command)
    if as_json:
        click.echo(json.dumps(result["headline"], indent=2))
    else:
        _console().print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in result["headline"].items()), style="dim")
        click.echo(str(written["markdown"]))


@main.command()
@click.argument("artifact_dir", type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="Quantised artifact directory.")
@click.option("--precision", required=True, type=click.Choice(["int8", "fp8", "int4"]))
@click.option("--method", default=None, help="int8: minmax, entropy, percentile, "
              "modelopt-max, modelopt-entropy, nbits, qmoe; int4: nbits, awq_clip, rtn_dq, ort-dq, "
              "qmoe; fp8: modelopt-max, modelopt-entropy (default: by precision, --profile "
              "and the MoE export form).")
@click.option("--calib", default=None, help="Calibration data: a .txt or .jsonl file, or "
              "'tasks' / 'generic' (default: built in for the model).")
@click.option("--samples", default=32, show_default=True,
              help="Calibration states (half from the float model's own decoding).")
@click.option("--calib-mode", default="mixed", show_default=True,
              type=click.Choice(["mixed", "forward", "trajectory"]),
              help="Forward-process states, the float model's own trajectories, or both.")
@click.option("--exclude", multiple=True, help="Keep nodes matching this name pattern "
              "(fnmatch) or op type in high precision; repeatable.")
@click.option("--quantize-router", is_flag=True, help="Quantise MoE routers too.")
@click.option("--quantize-head", is_flag=True, help="Quantise the decode head too (as "
              "llama.cpp's q8_0 does; the gate judges it with the rest).")
@click.option("--profile", "profile_name", default=None,
              help="Target device profile: refuses precisions it lacks, picks the format.")
@click.option("--min-agreement", type=float, default=None,
              help="Gate bar: masked top-1 agreement at the worst mask ratio.")
@click.option("--max-elbo-increase", type=float, default=None,
              help="Gate bar: relative increase of ELBO bits per token.")
@click.option("--max-task-drop", type=float, default=None,
              help="Gate bar: drop of mean task accuracy (default model).")
@click.option("--min-generation-agreement", type=float, default=None,
              help="Gate bar: share of equal tokens in temperature-0 generations.")
@click.option("--no-gate", is_flag=True, help="Skip the quality gate (artifact still valid).")
@click.option("--install-modelopt", is_flag=True,
              help="Create ModelOpt's own environment on first use (~2 GB).")
@click.option("--overwrite", is_flag=True)
@user_errors
def quantize(artifact_dir, out_dir, precision, method, calib, samples, calib_mode, exclude,
             quantize_router, quantize_head, profile_name, min_agreement, max_elbo_increase,
             max_task_drop, min_generation_agreement, no_gate, install_modelopt, overwrite):
    """Quantise an fp32 artifact (INT8, FP8, INT4) and judge it against the float one."""
    from dllm_export.calibration.quantize import QuantizeOptions, quantize_artifact

    bars = {"min_agreement": min_agreement, "max_elbo_increase": max_elbo_increase,
            "max_task_drop": max_task_drop, "min_generation_agreement": min_generation_agreement}
    options = QuantizeOptions(
        precision=precision, method=method, calib=calib, samples=samples,
        calib_mode=calib_mode, exclude=tuple(exclude), quantize_router=quantize_router,
        quantize_head=quantize_head, profile=profile_name,
        bars={k: v for k, v in bars.items() if v is not None},
        gate=not no_gate, install_modelopt=install_modelopt, overwrite=overwrite)
    with _StageProgress() as progress:
        manifest = quantize_artifact(artifact_dir, out_dir, options, report=progress)
    from dllm_export.calibration.report import print_quantization

    print_quantization(out_dir, manifest, _console())


@main.command("eval")
@click.argument("model", type=click.Path())
@click.option("--compare", "other", type=click.Path(), default=None,
              help="A second checkpoint or artifact, compared on identical inputs.")
@click.option("--tasks", "task_names", default=None,
              help="Comma-separated tasks (default: all of add,sort,reverse,recall).")
@click.option("--samples", default=50, show_default=True, help="Held-out problems per task.")
@click.option("--mc-num", default=32, show_default=True,
              help="Monte-Carlo copies per sequence for the ELBO (0 skips it).")
@click.option("--mc-batch", default=16, show_default=True,
              help="Copies per stratified group (LLaDA's batch_size).")
@click.option("--ratios", default=None, help="Mask ratios, comma-separated (default 0.1,...,0.9).")
@click.option("--eval-seed", default=0, show_default=True,
              help="Seeds the masked positions and the ELBO's draws.")
@click.option("--batch", type=int, default=None,
              help="Rows per forward (default: the artifact's batch, or 16).")
@click.option("--provider", default="cpu", show_default=True,
              type=click.Choice(["cpu", "cuda", "tensorrt"]), help="ONNX Runtime provider.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--json", "json_path", type=click.Path(), default=None,
              help="Write the JSON report here (default: stdout).")
@click.option("--cache-modes", default=None,
              help="Also generate in each of these cache modes (e.g. none,dual,block) and "
                   "report task accuracy beside speed.")
@click.option("--thresholds", default=None,
              help="With --cache-modes: each mode also with these Fast-dLLM thresholds.")
@click.option("--samplers", default=None,
              help="Also generate with each of these decoding modes of a draft-and-verify "
                   "model (autoregressive,block,lossless,logit-mix), on every model, timed "
                   "interleaved, and report task accuracy beside speed.")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="With --samplers: write a PNG of task accuracy against tokens/s here.")
@sampler_options
@user_errors
def eval_command(model, other, task_names, samples, mc_num, mc_batch, ratios, eval_seed, batch,
                 provider, threads, json_path, cache_modes, thresholds, samplers, plot_path,
                 **kwargs):
    """Quality and speed of a checkpoint or artifact: masked accuracy, ELBO, task accuracy."""
    from dllm_export.eval.harness import EvalOptions, evaluate
    from dllm_export.eval.report import print_report
    from dllm_export.jsonio import write_json

    options = EvalOptions(tasks=task_names, samples=samples, ratios=ratios, mc_num=mc_num,
                          mc_batch=mc_batch, seed=eval_seed, batch=batch,
                          sampler=_sampler_overrides(kwargs), provider=provider, threads=threads,
                          cache_modes=cache_modes, thresholds=thresholds, samplers=samplers)
    if plot_path and not options.samplers:
        raise DllmExportError("--plot draws the decoding modes: give --samplers too")
    with _StageProgress() as progress:
        report = evaluate(model, other, options, progress=progress)
    print_report(report, _console())
    if plot_path:
        from dllm_export.eval.plots import plot_samplers

        _console().print(f"plot: {plot_samplers(report, plot_path)}")
    if json_path:
        write_json(json_path, report)
    else:
        click.echo(json.dumps(report, indent=2))


@main.command()
@click.option("-o", "--out", "out_dir", default="out/demo", show_default=True, type=click.Path())
@click.option("--model", "model_dir", default=None, type=click.Path(),
              help="Checkpoint (default: the shipped default model).")
@click.option("--base", "base_dir", default=None, type=click.Path(),
              help="The autoregressive checkpoint a draft-and-verify --model is compared "
              "with (default: the shipped base, for the default model).")
@click.option("--samples", default=10, show_default=True, help="Held-out problems per task.")
@click.option("--stages", default=None,
              help="Comma-separated subset of inspect,export,generate,eval,quantize,profile.")
@user_errors
def demo(out_dir, model_dir, base_dir, samples, stages):
    """The whole pipeline on the shipped default model, on the CPU."""
    from dllm_export.demo import DEFAULT_MODEL, STAGES, run_demo

    chosen = tuple(s.strip() for s in stages.split(",")) if stages else STAGES
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise DllmExportError(f"--stages {','.join(unknown)}: choose from {','.join(STAGES)}")
    with _StageProgress() as progress:  # one console, so prints land above the spinner
        run_demo(out_dir, model_dir or DEFAULT_MODEL, samples, chosen,
                 console=progress.progress.console, progress=progress, base_dir=base_dir)


def entry_point():
    """The console script: ``main`` with SIGTERM handled like Ctrl-C. The handler removes
    this process's partial output directories and exits at once (an exception raised from
    a signal handler can land in a finaliser, where Python ignores it)."""
    import os
    import signal

    from dllm_export.jsonio import remove_in_progress

    def terminated(signum, frame):
        remove_in_progress()
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    signal.signal(signal.SIGTERM, terminated)
    main()


if __name__ == "__main__":
    entry_point()
