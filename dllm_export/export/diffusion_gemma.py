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

The graphs go through the export's passes (nodes named by module path, so quantisation
recipes speak in checkpoint names) and share one weights file (``prefill.onnx.data``: the
two encoder graphs hold the same parameters, the decoder shares the embedding); then each
graph is run on ONNX Runtime against the PyTorch model (``validate_graphs``) and the
result decides the manifest's ``valid``.

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

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.integrity import record_files
from dllm_export.jsonio import atomic_directory, write_json
from dllm_export.runtime.diffusion_gemma import gemma_defaults
from dllm_export.runtime.tokenizer import copy_tokenizer_files

GRAPHS = ("prefill", "commit", "decoder")
# float32 graphs against PyTorch: cache keys/values, entropies and soft embeddings (max abs
# difference; measured about 1e-6 on the tiny checkpoint), and the share of equal argmax
# and inverse-CDF samples under the same uniforms
TOLERANCE = 1e-4
MIN_TOKEN_AGREEMENT = 0.99


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
                  capacity: int | None = None, moe: str = "dense", opset: int = 18,
                  validate: bool = True, overwrite: bool = False) -> dict:
    """Export prefill, commit and decoder for ``batch`` rows, prompts up to
    ``prompt_length`` tokens and a cache of ``capacity`` slots (default: the prompt and
    four canvases), validated against PyTorch unless ``validate`` is False. Returns the
    manifest (also written as manifest.json)."""
    from dllm_export.jsonio import check_output
    from dllm_export.models import load_model, set_moe_strategy

    check_output(Path(out_dir), (Path(model_dir),), overwrite)  # before anything loads
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
    rows = {"prefill": prompt_length, "commit": canvas, "decoder": canvas}
    with atomic_directory(Path(out_dir), overwrite=overwrite, inputs=(Path(model_dir),)) as tmp:
        _trace_graphs(model, tmp, batch, rows, capacity, opset)
        copy_tokenizer_files(model_dir, tmp)  # the runtime's Generator reads them here
        generation = checkpoint.generation_config
        eos = generation.get("eos_token_id", checkpoint.config.get("eos_token_id"))
        manifest = {
            "format": "dllm-export", "kind": "onnx", "family": "diffusion-gemma",
            "precision": "fp32", "quantization": None,
            "special_tokens": {"eos_ids": sorted({eos} if isinstance(eos, int) else set(eos or ())),
                               "pad_id": generation.get("pad_token_id",
                                                        checkpoint.config.get("pad_token_id"))},
            "generation_defaults": gemma_defaults(generation),
            "graphs": {graph: {"file": f"{graph}.onnx", "rows": rows[graph]} for graph in GRAPHS},
            "batch": batch, "prompt_length": prompt_length, "capacity": capacity,
            "canvas_length": canvas, "vocab_size": args.vocab_size,
            "hidden_size": args.hidden_size, "moe": moe,
            "cache": [{"kv_heads": kv, "head_dim": d} for d, kv in args.layer_shapes],
            "source": {"checkpoint": str(Path(model_dir).resolve()),
                       "fingerprint": checkpoint.fingerprint(), "config": checkpoint.config},
        }
        manifest["validation"] = {"passed": None, "skipped": True}
        if validate:
            set_moe_strategy(model, "eager")  # the reference formulation
            manifest["validation"] = validate_graphs(model, tmp, manifest)
        manifest["valid"] = manifest["validation"]["passed"] is not False
        manifest["files"] = record_files(tmp)
        write_json(tmp / "manifest.json", manifest)
    if not manifest["valid"]:
        raise DllmExportError(f"{out_dir}: {validation_failure(manifest['validation'])}")
    return manifest


def validation_summary(validation: dict) -> str:
    graphs = validation["graphs"]
    return ("validated against PyTorch: " + ", ".join(
        f"{name} max abs diff {case['max_abs_diff']:.1e}" for name, case in graphs.items())
        + f", decoder argmax agreement {graphs['decoder']['argmax_agreement']:.3f}, samples "
          f"{graphs['decoder']['sample_agreement']:.3f}")


def validation_failure(validation: dict) -> str:
    failed = [f"{name} {key} {case[key]:.2e}" for name, case in validation["graphs"].items()
              for key in case.get("failed", ())]
    return (f"the graphs differ from PyTorch ({'; '.join(failed)}; tolerance "
            f"{validation['tolerance']}, token agreement {validation['min_token_agreement']}); "
            "the artifact is marked invalid")


def _trace_graphs(model, tmp: Path, batch: int, rows: dict, capacity: int, opset: int) -> None:
    """Trace the three graphs into ``tmp``, named by module path, one weights file."""
    import torch

    from dllm_export.export.passes import run_passes
    from dllm_export.export.shared_weights import WeightsFile

    Encoder, Decoder = _modules()
    layers = model.args.num_hidden_layers
    weights = None
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
        run_passes(program.model)
        program.save(str(tmp / f"{graph}.onnx"), external_data=True)
        del program
        if weights is None:
            weights = WeightsFile(tmp / f"{graph}.onnx")
        else:
            weights.adopt(tmp / f"{graph}.onnx")


def _largest(pairs) -> float:
    return max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
               for a, b in pairs)


def _cache_difference(torch_steps, onnx_steps, start: int, end: int) -> float:
    theirs = [t.numpy() for layer in torch_steps.past for t in layer]
    return _largest((ours[:, :, start:end], ref[:, :, start:end])
                    for ours, ref in zip(onnx_steps.cache, theirs, strict=True))


def validate_graphs(model, directory, manifest: dict, seed: int = 0, threads: int = 1) -> dict:
    """The artifact's graphs on ONNX Runtime against the PyTorch model on one random prompt
    (filling the prompt bucket where the cache leaves room for two canvases), a commit
    pass over a random canvas, and two decoder steps on the next one (without, then with,
    the previous step's self-conditioning signal), under the same uniforms."""
    from dllm_export.runtime.diffusion_gemma import OnnxSteps, TorchSteps

    rng = np.random.default_rng(seed)
    batch, canvas, vocab = manifest["batch"], manifest["canvas_length"], manifest["vocab_size"]
    room = manifest["capacity"] - 2 * canvas
    prompt = rng.integers(0, vocab, (batch, max(1, min(manifest["prompt_length"], room))))
    length = prompt.shape[1]
    reference = TorchSteps(model)
    ours = OnnxSteps(directory, threads=threads, manifest=manifest)
    graphs = {}
    for steps in (reference, ours):
        steps.reset(batch)
        steps.encode(prompt, 0)
    graphs["prefill"] = {"max_abs_diff": _cache_difference(reference, ours, 0, length)}
    start = length
    if room >= 1:
        committed = rng.integers(0, vocab, (batch, canvas))
        for steps in (reference, ours):
            steps.encode(committed, start)
        graphs["commit"] = {"max_abs_diff": _cache_difference(reference, ours, start,
                                                              start + canvas)}
        start += canvas
    tokens = rng.integers(0, vocab, (batch, canvas))
    signals, decoder = (None, None), []
    for _ in range(2):
        uniform = rng.random((batch, canvas), dtype=np.float32)
        a = reference.denoise(tokens, start, 0.7, signals[0], uniform)
        b = ours.denoise(tokens, start, 0.7, signals[1], uniform)
        soft = model.soft_embeddings(a[3]).numpy()
        decoder.append({"entropy": _largest([(a[2], b[2])]), "signal": _largest([(soft, b[3])]),
                        "argmax": float((a[1] == b[1]).mean()),
                        "sample": float((a[0] == b[0]).mean())})
        signals = (a[3], b[3])
    graphs["decoder"] = {
        "max_abs_diff": max(max(d["entropy"], d["signal"]) for d in decoder),
        "argmax_agreement": min(d["argmax"] for d in decoder),
        "sample_agreement": min(d["sample"] for d in decoder)}
    for case in graphs.values():
        case["failed"] = [key for key, value in case.items()
                          if (key == "max_abs_diff" and value > TOLERANCE)
                          or (key.endswith("agreement") and value < MIN_TOKEN_AGREEMENT)]
    return {"passed": not any(case["failed"] for case in graphs.values()),
            "tolerance": TOLERANCE, "min_token_agreement": MIN_TOKEN_AGREEMENT,
            "reference": "models/diffusion_gemma.py in PyTorch, float32", "graphs": graphs}


def revalidate(artifact_dir: Path, manifest: dict, model_dir=None, report=None) -> dict:
    """``dllm-export validate`` for a float DiffusionGemma artifact: its files against their
    records, then ``validate_graphs`` against the source checkpoint (or ``model_dir``), the
    result written to its manifest."""
    from dllm_export.integrity import verify_files
    from dllm_export.models import load_model, set_moe_strategy

    report = report or (lambda stage, detail="": None)
    if "files" not in manifest:
        raise DllmExportError(f"{artifact_dir}: exported before validate took DiffusionGemma "
                              "artifacts (no file records): export it again")
    if manifest.get("quantization"):
        raise DllmExportError(f"{artifact_dir}: a {manifest['precision']} artifact; its "
                              "quality gate judged it (validate compares float exports)")
    report("verify", "every file against its recorded sha256")
    verify_files(Path(artifact_dir), manifest, full=True)
    source = Path(model_dir or manifest["source"]["checkpoint"])
    if not source.is_dir():
        raise DllmExportError(f"{source}: the source checkpoint is gone; pass --model "
                              "MODEL_DIR to validate against")
    report("load", str(source))
    model, checkpoint = load_model(source)
    if checkpoint.fingerprint() != manifest["source"]["fingerprint"]:
        raise DllmExportError(f"{source}: checkpoint fingerprint differs from the one this "
                              "artifact was exported from; validate against the original "
                              "checkpoint")
    set_moe_strategy(model, "eager")
    report("validate", "ONNX Runtime CPU vs PyTorch")
    manifest["validation"] = validate_graphs(model, Path(artifact_dir), manifest)
    manifest["valid"] = manifest["validation"]["passed"]
    write_json(Path(artifact_dir) / "manifest.json", manifest)
    return manifest


def export_cli(model_dir, out_dir, seq_len: int, batch: int, dtype: str, moe: str,
               opset: int, validate: bool = True, overwrite: bool = False) -> dict:
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
                             moe=form, opset=opset, validate=validate, overwrite=overwrite)
    print(f"{out_dir}: {', '.join(GRAPHS)} (batch {batch}, prompt up to "
          f"{manifest['prompt_length']}, cache {seq_len} slots, MoE {form})")
    if validate:
        print(validation_summary(manifest["validation"]))
    return manifest
