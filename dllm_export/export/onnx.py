"""``export``: a checkpoint in, a validated, self-contained ONNX artifact out.

The fixed-shape denoiser (``models/head.py: Denoiser``) is traced with
``torch.onnx.export(dynamo=True)``, weights always go to external data, the onnxscript
optimizer cleans the graph, and ``passes.py`` names nodes after their modules. Then the
graph is linted for TensorRT (``trt_lint``) and ONNX Runtime CPU is compared with PyTorch
(``validate``). The directory appears only when complete (``atomic_directory``); an
artifact whose validation failed is written with ``"valid": false`` and the command fails.

Graph I/O (see docs/architecture.md):

| name             | shape     | dtype   |
|------------------|-----------|---------|
| input_ids        | [B, L]    | int64   |
| attention_mask   | [B, L]    | int64   |
| topk_ids         | [B, L, K] | int64   |
| topk_logprobs    | [B, L, K] | float32 |
| neg_entropy      | [B, L]    | float32 |
| special_logprobs | [B, L, S] | float32 |
| logits (instead) | [B, L, V] | float32 |
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from dllm_export.errors import DllmExportError
from dllm_export.jsonio import atomic_directory, write_json

DTYPES = ("fp32", "fp16", "bf16")
OUTPUT_KINDS = ("decode", "logits")
EXPORT_STRATEGIES = ("dense", "sparse", "ort")
# From benchmarks/bench_moe_strategies.py on ONNX Runtime CPU: dense is the fastest form
# TensorRT can parse (sparse pays for gathering expert weights per block), and the one every
# quantiser handles; `ort` (com.microsoft::MoE) is faster still but ONNX Runtime only.
DEFAULT_MOE = "dense"
LOGITS_GRAPH = "model_logits.onnx"  # same graph and weights, plus the full logits output
DECODE_OUTPUTS = ("topk_ids", "topk_logprobs", "neg_entropy", "special_logprobs")
INPUTS = (
    {"name": "input_ids", "dtype": "int64", "meaning": "canvas: left-padded prompt, committed tokens, mask ids"},
    {"name": "attention_mask", "dtype": "int64", "meaning": "1 for real tokens, 0 for left padding"},
)
OUTPUT_MEANINGS = {
    "topk_ids": ("int64", "the K most likely tokens per position, best first"),
    "topk_logprobs": ("float32", "their log-probabilities over the whole vocabulary"),
    "neg_entropy": ("float32", "sum p log(p + 1e-10) per position"),
    "special_logprobs": ("float32", "log-probabilities of special_ids (EOS, EoT)"),
    "logits": ("float32", "full logits; row p predicts position p"),
}


@dataclass
class ExportOptions:
    seq_len: int = 256
    batch: int = 1
    dtype: str = "fp32"
    moe: str = DEFAULT_MOE
    moe_block: int = 16
    outputs: str = "decode"
    opset: int = 18
    topk: int = 8
    validate: bool = True
    overwrite: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise DllmExportError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.outputs not in OUTPUT_KINDS:
            raise DllmExportError(f"--outputs {self.outputs!r}: choose decode or logits")
        if self.moe not in EXPORT_STRATEGIES:
            raise DllmExportError(
                f"--moe {self.moe!r}: choose one of {', '.join(EXPORT_STRATEGIES)} "
                "(eager has data-dependent shapes and cannot be exported)")
        if self.seq_len < 2 or self.batch < 1:
            raise DllmExportError("--seq-len must be at least 2 and --batch at least 1")
        if not 18 <= self.opset <= 24:
            raise DllmExportError(
                f"--opset {self.opset}: the torch.export-based exporter writes opsets 18 to 24")
        if self.topk < 2:
            raise DllmExportError("--topk must be at least 2 (margins need the runner-up)")


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _versions() -> dict:
    out = {}
    for package in ("dllm-export", "torch", "onnx", "onnxscript", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[package] = metadata.version(package)
    return out


def _max_positions(config: dict) -> int | None:
    for key in ("max_sequence_length", "max_position_embeddings"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def fit_generation_defaults(defaults, seq_len: int):
    """Shrink the family's sampler defaults so that a prompt still fits the fixed length."""
    gen_length = defaults.gen_length
    if gen_length <= seq_len // 2:
        return defaults
    gen_length = max(1, seq_len // 2)
    block = defaults.block_length
    if block and gen_length % block:
        block = gen_length
    return dataclasses.replace(defaults, gen_length=gen_length, steps=gen_length,
                               block_length=block)


def _trace(denoiser, options: ExportOptions, has_moe: bool):
    """torch.onnx.export(dynamo=True) with the exporter's chatter kept off the terminal."""
    import torch

    batch, length = options.batch, options.seq_len
    example = (torch.zeros(batch, length, dtype=torch.long),
               torch.ones(batch, length, dtype=torch.long))
    table = None
    if has_moe and options.moe == "ort":
        from dllm_export.export.onnx_moe import translation_table

        table = translation_table()
    outputs = list(DECODE_OUTPUTS) if options.outputs == "decode" else ["logits"]
    log = io.StringIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # onnxscript prints notes on both streams. onnx_ir logs "Attribute type is ambiguous" for
    # the exporter's empty attribute lists later, when the model is saved; its warnings carry
    # nothing a user can act on, so the exporter keeps it at ERROR from here on.
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                denoiser, example, None, dynamo=True, opset_version=options.opset,
                input_names=[i["name"] for i in INPUTS], output_names=outputs,
                custom_translation_table=table, optimize=True, verbose=False,
            )
        except Exception as err:
            raise DllmExportError(
                f"torch.onnx.export failed: {type(err).__name__}: {str(err).splitlines()[0]}"
            ) from err
        finally:
            quiet.setLevel(level)
    return program, outputs


def _manifest(checkpoint, options, special, tokenizer, model, outputs, defaults) -> dict:
    from dllm_export.models import family_module

    module = family_module(checkpoint.family)
    moe_blocks = getattr(model, "moe_blocks", lambda: [])()
    moe = None
    if moe_blocks:
        first = moe_blocks[0]
        moe = {"strategy": options.moe, "block": options.moe_block,
               "experts": len(first.experts), "top_k": first.top_k}
    batch, length = options.batch, options.seq_len
    special_ids = [t for t in (special.eos_id, special.eot_id) if t is not None]
    shapes = {"input_ids": [batch, length], "attention_mask": [batch, length],
              "topk_ids": [batch, length, options.topk],
              "topk_logprobs": [batch, length, options.topk],
              "neg_entropy": [batch, length],
              "special_logprobs": [batch, length, len(special_ids)],
              "logits": [batch, length, model_vocab(model)]}
    return {
        "format": "dllm-export",
        "format_version": 1,
        "kind": "onnx",
        "family": checkpoint.family,
        "source": {"checkpoint": str(checkpoint.directory.resolve()),
                   "fingerprint": checkpoint.fingerprint(), "config": checkpoint.config},
        "graph": {"file": "model.onnx", "data": "model.onnx.data", "opset": options.opset},
        "shapes": {"batch": batch, "seq_len": length},
        "dtype": options.dtype,
        "precision": options.dtype,
        "vocab_size": model_vocab(model),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "special_tokens": special.as_dict(),
        "special_ids": special_ids,
        "topk": options.topk,
        "outputs": options.outputs,
        "shift_logits": bool(module.SHIFT_LOGITS),
        "moe": moe,
        "inputs": [{**spec, "shape": shapes[spec["name"]]} for spec in INPUTS],
        "output_specs": [{"name": name, "shape": shapes[name], "dtype": OUTPUT_MEANINGS[name][0],
                          "meaning": OUTPUT_MEANINGS[name][1]} for name in outputs],
        "generation_defaults": asdict(defaults),
        "versions": _versions(),
        "validation": None,
        "trt_compatibility": None,
        "quantization": None,
        "valid": False,
    }


def model_vocab(model) -> int:
    args = model.args
    return getattr(args, "embedding_size", None) or args.vocab_size


def export_model(model_dir, out_dir, options: ExportOptions, report=None) -> dict:
    """Export ``model_dir`` to ``out_dir``; returns the manifest. ``report(stage, detail)``
    receives progress. Raises DllmExportError when validation fails (after writing)."""
    from dllm_export.checkpoint import open_checkpoint, resolve_special_tokens
    from dllm_export.export.trt_lint import check_trt
    from dllm_export.export.validate import run_validation
    from dllm_export.models import load_model, set_moe_strategy
    from dllm_export.models.head import DecodeHead, Denoiser
    from dllm_export.runtime.api import sampler_defaults
    from dllm_export.runtime.backends.onnxruntime import OrtBackend
    from dllm_export.runtime.backends.torch_backend import TorchBackend
    from dllm_export.runtime.tokenizer import TOKENIZER_FILES, TextTokenizer

    report = report or (lambda stage, detail="": None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not options.overwrite:
        raise DllmExportError(f"{out_dir}: already exists; choose another path or pass --overwrite")
    checkpoint = open_checkpoint(model_dir)
    limit = _max_positions(checkpoint.config)
    if limit and options.seq_len > limit:
        raise DllmExportError(
            f"--seq-len {options.seq_len} exceeds the model's {limit} positions (config.json)")
    tokenizer = TextTokenizer(model_dir)
    tokenizer.check_chat_template()  # the artifact carries it: refuse a hostile one now
    special = resolve_special_tokens(checkpoint.config, checkpoint.generation_config,
                                     tokenizer, Path(model_dir))
    total = len(checkpoint.weight_map)
    loaded = [0]

    def on_tensor(name):
        loaded[0] += 1
        report("load", f"{loaded[0]}/{total} tensors")

    model, _ = load_model(model_dir, dtype=_torch_dtype(options.dtype), progress=on_tensor)
    has_moe = bool(getattr(model, "moe_blocks", lambda: [])())
    if has_moe:
        set_moe_strategy(model, options.moe, options.moe_block)
    special_ids = tuple(t for t in (special.eos_id, special.eot_id) if t is not None)
    head = DecodeHead(options.topk, special_ids) if options.outputs == "decode" else None
    report("trace", f"torch.onnx.export dynamo, opset {options.opset}, [{options.batch}, {options.seq_len}]")
    program, outputs = _trace(Denoiser(model, head), options, has_moe)
    from dllm_export.export.passes import run_passes, write_logits_graph

    run_passes(program.model)
    defaults = fit_generation_defaults(
        sampler_defaults(checkpoint.family, checkpoint.generation_config), options.seq_len)
    manifest = _manifest(checkpoint, options, special, tokenizer, model, outputs, defaults)
    with atomic_directory(out_dir, overwrite=options.overwrite) as tmp:
        report("save", "model.onnx + external data")
        program.save(str(tmp / "model.onnx"), external_data=True)
        del program
        gc.collect()
        if options.outputs == "decode":
            write_logits_graph(tmp / "model.onnx", tmp / LOGITS_GRAPH)
            manifest["graph"]["logits_file"] = LOGITS_GRAPH
        for name in TOKENIZER_FILES:
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, tmp / name)
        report("check-trt", "TensorRT operator support")
        findings = check_trt(tmp / "model.onnx")
        manifest["trt_compatibility"] = {
            "clean": not any(f.severity == "error" for f in findings),
            "findings": [asdict(f) for f in findings],
        }
        if options.validate:
            report("validate", "ONNX Runtime CPU vs PyTorch")
            if has_moe:
                set_moe_strategy(model, "eager")  # compare with the reference formulation
            reference = TorchBackend(model, special_ids, topk=options.topk)
            backend = OrtBackend(tmp, manifest, provider="cpu")
            manifest["validation"] = run_validation(
                reference, backend, manifest, progress=lambda case, m: report("validate", case))
            manifest["valid"] = manifest["validation"]["passed"]
        else:
            manifest["valid"] = True
            manifest["validation"] = {"passed": None, "skipped": True}
        write_json(tmp / "manifest.json", manifest)
    if not manifest["valid"]:
        worst = min(manifest["validation"]["results"], key=lambda r: r["top1_agreement"])
        raise DllmExportError(
            f"{out_dir}: validation failed ({worst['case']}: top-1 agreement "
            f"{worst['top1_agreement']:.4f}, cosine {worst['cosine_mean']:.6f}; bars "
            f"{manifest['validation']['bars']}); the artifact is marked invalid")
    return manifest


def validate_artifact(artifact_dir, model_dir=None, report=None) -> dict:
    """Rerun the validation of an artifact against its source checkpoint (or ``model_dir``)
    and record the result in its manifest."""
    from dllm_export.export.validate import run_validation
    from dllm_export.jsonio import read_json
    from dllm_export.models import load_model
    from dllm_export.runtime.backends.onnxruntime import OrtBackend
    from dllm_export.runtime.backends.torch_backend import TorchBackend

    report = report or (lambda stage, detail="": None)
    artifact_dir = Path(artifact_dir)
    manifest = read_json(artifact_dir / "manifest.json", "the artifact manifest")
    source = Path(model_dir or manifest["source"]["checkpoint"])
    if not source.is_dir():
        raise DllmExportError(
            f"{source}: the source checkpoint is gone; pass --model MODEL_DIR to validate against")
    report("load", str(source))
    model, checkpoint = load_model(source, dtype=_torch_dtype(manifest["dtype"]))
    if checkpoint.fingerprint() != manifest["source"]["fingerprint"]:
        raise DllmExportError(
            f"{source}: checkpoint fingerprint differs from the one this artifact was exported "
            "from; validate against the original checkpoint")
    reference = TorchBackend(model, tuple(manifest["special_ids"]), topk=manifest["topk"])
    backend = OrtBackend(artifact_dir, manifest, provider="cpu")
    manifest["validation"] = run_validation(
        reference, backend, manifest, progress=lambda case, m: report("validate", case))
    manifest["valid"] = manifest["validation"]["passed"]
    write_json(artifact_dir / "manifest.json", manifest)
    return manifest
