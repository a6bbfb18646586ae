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
@click.option("--family", required=True, type=click.Choice(["llada", "llada-moe", "dream"]))
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
        click.option("--algorithm", type=click.Choice(["llada", "dream"]), default=None,
                     help="Unmasking loop (default: the family's own)."),
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
    ]
    for option in reversed(options):
        func = option(func)
    return func


SAMPLER_KEYS = ("algorithm", "gen_length", "steps", "block_length", "remasking", "threshold",
                "alg", "alg_temp", "temperature", "top_p", "top_k", "cfg_scale",
                "logits_eos_inf", "confidence_eos_eot_inf", "seed", "early_exit")


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


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--moe", type=click.Choice(["eager", "dense", "sparse", "ort"]), default=None,
              help="How MoE layers run in PyTorch (default: eager).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--show-steps", is_flag=True, help="Show the canvas filling in step by step.")
@click.option("--truncate", is_flag=True, help="Left-truncate a prompt that does not fit.")
@sampler_options
@user_errors
def generate(model_dir, prompt, chat, moe, device, show_steps, truncate, **kwargs):
    """Generate with the PyTorch reference backend, straight from a checkpoint."""
    from dllm_export.runtime import Generator

    overrides = _sampler_overrides(kwargs)
    generator = Generator.from_checkpoint(model_dir, device=device, moe=moe)
    _print_generation(generator, prompt, chat, show_steps, truncate, overrides)


if __name__ == "__main__":
    main()
