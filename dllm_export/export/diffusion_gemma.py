"""DiffusionGemma's three fixed-shape graphs, traced with ``torch.onnx.export(dynamo=True)``
from ``models/diffusion_gemma.py`` (the runtime side is ``runtime/diffusion_gemma.py``).

Every graph attends over a cache of ``capacity`` slots (slot j holds position j) plus its
own rows, under ``attention_mask`` [B, Lq, capacity + Lq] (True: visible); the cache is
one (keys, values) pair per layer, whose shapes differ by layer type (sliding: the config's
key/value heads and head_dim; full: ``per_layer_config``'s): ``past_key_{i}``,
``past_value_{i}`` in, ``present_key_{i}``, ``present_value_{i}`` out (the rows' own).

* ``prefill`` (Lq = the prompt bucket) and ``commit`` (Lq = canvas_length): the causal
  encoder; outputs the presents, which the caller writes at the rows' slots (a prompt is
  right-padded to the bucket: causal rows never see the padding, and only the real rows
  are written).
* ``decoder`` (Lq = canvas_length): one denoising step, bidirectional over the cache and
  the canvas, writing nothing. Inputs besides the cache: ``signal`` [B, L, D] (the previous
  step's soft embeddings, zeros at the first step), ``temperature`` [1] and ``uniform``
  [B, L]. Outputs: ``sample`` (inverse-CDF draw from softmax(logits / temperature) with
  ``uniform``), ``argmax``, ``entropy`` [B, L] of the scaled logits, and ``next_signal``
  [B, L, D] = softmax(logits / temperature) x the embedding x its scale. So no logits leave
  the graph: per step the host sends L floats of noise and gets 3 L numbers back, and the
  signal (D per position, not V) goes round.

Where the noise comes from: the host draws one uniform per position and the graph samples
by inverse CDF over the full vocabulary. Exact sampling from the whole distribution with
L floats crossing (Gumbel-max needs V per position); reproducible on every backend (ONNX
Runtime, TensorRT and PyTorch get the same numbers, where in-graph random ops are seeded
per graph and differ by library); and a test can hand transformers the same uniforms.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from dllm_export.errors import DllmExportError
from dllm_export.jsonio import atomic_directory, write_json
from dllm_export.runtime.diffusion_gemma import gemma_defaults
from dllm_export.runtime.tokenizer import copy_tokenizer_files

GRAPHS = ("prefill", "commit", "decoder")


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def _modules():
    import torch
    from torch import nn

    from dllm_export.models.layers import KVCache

    def split(past):
        return [tuple(past[2 * i:2 * i + 2]) for i in range(len(past) // 2)]

    class Encoder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, attention_mask, *past):
            cache = KVCache(split(past))
            self.model(input_ids, positions=position_ids, visible=attention_mask, cache=cache)
            return tuple(t for states in cache.presents for t in states)

    class Decoder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, attention_mask, signal, temperature,
                    uniform, *past):
            logits = self.model(input_ids, positions=position_ids, visible=attention_mask,
                                cache=KVCache(split(past)), self_conditioning=signal)
            scaled = logits / temperature
            logprobs = torch.log_softmax(scaled, dim=-1)
            probs = logprobs.exp()
            entropy = -(probs * logprobs).sum(dim=-1)
            below = (torch.cumsum(probs, dim=-1) < uniform[..., None]).to(torch.int64)
            last = torch.tensor(scaled.shape[-1] - 1, dtype=torch.int64)
            sample = torch.minimum(below.sum(dim=-1), last)  # Min: TensorRT clips no int64
            argmax = torch.argmax(scaled, dim=-1)
            return sample, argmax, entropy, self.model.soft_embeddings(scaled)

    return Encoder, Decoder


def example_inputs(model, graph: str, batch: int, rows: int, capacity: int):
    import torch

    args = model.args
    dtype = model.model.decoder.embed_tokens.weight.dtype
    past = []
    for head_dim, kv_heads in args.layer_shapes:
        # distinct tensors: one object passed twice would be traced as one input
        past += [torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype)
                 for _ in range(2)]
    ids = torch.zeros(batch, rows, dtype=torch.int64)
    positions = torch.arange(capacity, capacity + rows)[None].expand(batch, -1).contiguous()
    visible = torch.ones(batch, rows, capacity + rows, dtype=torch.bool)
    if graph != "decoder":
        return (ids, positions, visible, *past)
    signal = torch.zeros(batch, rows, args.hidden_size, dtype=dtype)
    return (ids, positions, visible, signal, torch.ones(1), torch.full((batch, rows), 0.5),
            *past)


def input_names(graph: str, layers: int) -> list[str]:
    extra = ["signal", "temperature", "uniform"] if graph == "decoder" else []
    return ["input_ids", "position_ids", "attention_mask", *extra, *cache_names(layers, "past")]


def output_names(graph: str, layers: int) -> list[str]:
    if graph == "decoder":
        return ["sample", "argmax", "entropy", "next_signal"]
    return cache_names(layers, "present")


def export_graphs(model_dir, out_dir, batch: int = 1, prompt_length: int = 32,
                  capacity: int | None = None, moe: str = "dense", opset: int = 18) -> dict:
    """Export prefill, commit and decoder for ``batch`` rows, prompts up to
    ``prompt_length`` tokens and a cache of ``capacity`` slots (default: the prompt and
    four canvases). Returns the manifest (also written as manifest.json)."""
    import torch

    from dllm_export.models import load_model, set_moe_strategy

    model, checkpoint = load_model(model_dir)
    if checkpoint.family != "diffusion-gemma":
        raise DllmExportError(f"{model_dir}: family {checkpoint.family}, not diffusion-gemma")
    args = model.args
    canvas = args.canvas_length
    capacity = capacity or prompt_length + 4 * canvas
    if capacity < prompt_length + canvas:
        raise DllmExportError(f"--capacity {capacity}: needs at least the prompt bucket and "
                              f"one canvas ({prompt_length + canvas})")
    set_moe_strategy(model, moe)
    Encoder, Decoder = _modules()
    rows = {"prefill": prompt_length, "commit": canvas, "decoder": canvas}
    layers = args.num_hidden_layers
    with atomic_directory(Path(out_dir), overwrite=True) as tmp:
        for graph in GRAPHS:
            module = (Decoder if graph == "decoder" else Encoder)(model).eval()
            example = example_inputs(model, graph, batch, rows[graph], capacity)
            log = io.StringIO()
            logging.getLogger("onnx_ir").setLevel(logging.ERROR)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                    warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                try:
                    program = torch.onnx.export(
                        module, example, None, dynamo=True, opset_version=opset,
                        input_names=input_names(graph, layers),
                        output_names=output_names(graph, layers), optimize=True,
                        verbose=False)
                except Exception as err:
                    raise DllmExportError(
                        f"torch.onnx.export failed ({graph} graph): {type(err).__name__}: "
                        f"{str(err).splitlines()[0]}") from err
            program.save(str(tmp / f"{graph}.onnx"), external_data=True)
        copy_tokenizer_files(model_dir, tmp)  # the runtime's Generator reads them here
        generation = checkpoint.generation_config
        eos = generation.get("eos_token_id", checkpoint.config.get("eos_token_id"))
        manifest = {
            "format": "dllm-export", "kind": "onnx", "family": "diffusion-gemma",
            "special_tokens": {"eos_ids": sorted({eos} if isinstance(eos, int) else set(eos or ())),
                               "pad_id": generation.get("pad_token_id",
                                                        checkpoint.config.get("pad_token_id"))},
            "generation_defaults": gemma_defaults(generation),
            "graphs": {graph: {"file": f"{graph}.onnx", "rows": rows[graph]} for graph in GRAPHS},
            "batch": batch, "prompt_length": prompt_length, "capacity": capacity,
            "canvas_length": canvas, "vocab_size": args.vocab_size,
            "hidden_size": args.hidden_size, "moe": moe,
            "cache": [{"kv_heads": kv, "head_dim": d} for d, kv in args.layer_shapes],
            "source": {"config": checkpoint.config},
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def export_cli(model_dir, out_dir, seq_len: int, batch: int, dtype: str, moe: str,
               opset: int) -> dict:
    """``dllm-export export`` for DiffusionGemma: ``--seq-len`` is the cache's slots (prompt
    and generation), the prompt bucket is that minus one canvas."""
    from dllm_export.checkpoint import open_checkpoint
    from dllm_export.models import model_args

    args = model_args(open_checkpoint(model_dir))
    if dtype != "fp32":
        raise DllmExportError(f"--dtype {dtype}: DiffusionGemma exports fp32 graphs for now "
                              "(quantise them with dllm-export quantize)")
    if moe not in ("auto", "dense", "sparse"):
        raise DllmExportError(f"--moe {moe}: DiffusionGemma's GELU experts need dense or "
                              "sparse (com.microsoft::MoE runs SwiGLU)")
    if seq_len <= args.canvas_length:
        raise DllmExportError(f"--seq-len {seq_len}: the cache must hold a prompt and a canvas "
                              f"of {args.canvas_length} (give more than {args.canvas_length})")
    form = moe if moe != "auto" else ("dense" if args.num_experts <= 16 else "sparse")
    manifest = export_graphs(model_dir, out_dir, batch=batch,
                             prompt_length=seq_len - args.canvas_length, capacity=seq_len,
                             moe=form, opset=opset)
    print(f"{out_dir}: {', '.join(GRAPHS)} (batch {batch}, prompt up to "
          f"{manifest['prompt_length']}, cache {seq_len} slots, MoE {form})")
    return manifest
