"""``export``: a checkpoint in, a validated, self-contained ONNX artifact out.

The fixed-shape denoiser (``models/head.py: Denoiser``) is traced with
``torch.onnx.export(dynamo=True)``, weights always go to external data, the onnxscript
optimizer cleans the graph, and ``passes.py`` names nodes after their modules. With
``cache=True`` the cached graphs (``CachedDenoiser``: prefill, step, window, decode) are
traced from the same modules and share the canvas graph's weights file
(``shared_weights.py``). Then every graph is linted for TensorRT (``trt_lint``) and ONNX
Runtime CPU is compared with PyTorch (``validate``). The directory appears only when
complete (``atomic_directory``); an artifact whose validation failed is written with
``"valid": false`` and the command fails. Every graph's inputs and outputs are in
``dllm_export/contract.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import logging
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from dllm_export import contract, families
from dllm_export.errors import DllmExportError, check_at_least
from dllm_export.export.onnx_attention import (
    ATTENTION_FORMS,
    resolve_attention,
    rope_form,
)
from dllm_export.integrity import record_files
from dllm_export.jsonio import atomic_directory, check_output, write_json

DTYPES = ("fp32", "fp16", "bf16")
OUTPUT_KINDS = ("decode", "logits")
EXPORT_STRATEGIES = ("auto", "dense", "sparse", "ort")
# From benchmarks/bench_moe_strategies.py on ONNX Runtime CPU: dense is the fastest form
# TensorRT can parse (sparse pays for gathering expert weights per block), and the one every
# Q/DQ quantiser handles; `ort` (com.microsoft::MoE) is faster still but ONNX Runtime only
# (quantised by QMoE).
DEFAULT_MOE = "auto"
TARGETS = ("onnxruntime", "tensorrt")
# "auto", for ONNX Runtime targets: its fused MoE op (com.microsoft::MoE), which computes
# only the routed experts' rows, at any expert count (benchmarks/bench_moe_strategies and
# docs/performance.md: 16 experts of 256 at L=256, 2.5-2.7x the dense form's speed; LLaDA2
# with 64 experts, 32 tokens: 5.9 ms against dense 18.1, sparse 24.0), unless a block is one
# the op cannot compute (SwiGLU only, no expert bias: SparseMoeBlock.ort_refusal); then, and
# for TensorRT, which cannot run that op: dense up to DENSE_EXPERTS experts (the fastest
# TensorRT-clean form there, and the one every Q/DQ quantiser reaches). Beyond, dense
# computes E/k times the routed FLOPs (32x at 256 experts, top-8), so per graph the
# parser-clean sparse form (routed rows only) where there are more than DENSE_ROWS rows. Up
# to DENSE_ROWS the dense form is memory-bound on every shipped TensorRT device: it does 2
# FLOPs per weight per row, so with INT4 weights (what fits LLaDA2-mini on an Orin) 4 x 32 =
# 128 FLOP per byte, under the lowest fp16 ridge point of those profiles (147, Orin NX).
# There a step reads every expert once either way (32 rows x top-8 reach nearly all of
# 256), and dense spares the sparse form's gathered copy of those weights (1.5 GiB per
# layer for LLaDA2-mini's step; plan).
DENSE_EXPERTS = 16
DENSE_ROWS = 32


def resolve_moe(strategy: str, experts: int, target: str = "onnxruntime",
                rows: int | None = None, fused: bool = True) -> str:
    """The MoE form an export makes for a graph of ``rows`` token rows (None: a canvas too
    large to say); ``fused``: whether com.microsoft::MoE can compute the model's blocks.
    Torch-free, so plan sizes the same one."""
    if strategy != "auto":
        return strategy
    if target == "onnxruntime" and fused:
        return "ort"
    if experts <= DENSE_EXPERTS:
        return "dense"
    return "dense" if rows is not None and rows <= DENSE_ROWS else "sparse"


def moe_form(options: "ExportOptions", experts: int, top_k: int, rows: int) -> dict:
    """One graph's MoE form and, for the sparse form, its rows per expert block."""
    form = resolve_moe(options.requested_moe or options.moe, experts, options.target, rows,
                       options.moe_ort_refusal is None)
    block = (options.moe_block or sparse_block(rows, top_k, experts)) if form == "sparse" else None
    return {"form": form, "block": block}


def _ort_refused(options: "ExportOptions") -> bool:
    """--moe auto would have taken com.microsoft::MoE but the model's blocks refuse it."""
    return bool(options.moe_ort_refusal and options.requested_moe == "auto"
                and options.target == "onnxruntime")


def sparse_block(tokens: int, top_k: int, experts: int) -> int:
    """Rows per expert block of the sparse form for a graph of ``tokens`` tokens: about the
    routed pairs per expert (a power of two, 1 to 16), so that padding stays small and
    each block's expert weights are gathered for rows that use them."""
    per_expert = max(1, tokens * top_k // max(experts, 1))
    return min(16, 1 << (per_expert.bit_length() - 1))
LOGITS_GRAPH = "model_logits.onnx"  # same graph and weights, plus the full logits output
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class ExportOptions:
    seq_len: int = 256
    batch: int = 1
    dtype: str = "fp32"
    moe: str = DEFAULT_MOE
    moe_block: int | None = None  # sparse rows per expert block; None: per graph (sparse_block)
    outputs: str = "decode"
    opset: int = 18
    topk: int = 8
    validate: bool = True
    overwrite: bool = False
    requested_moe: str | None = None  # what --moe said, before auto was resolved
    # why com.microsoft::MoE cannot compute the model's blocks (None: it can; set by export)
    moe_ort_refusal: str | None = None
    # also the cached graphs (contract.CACHED_GRAPHS); None: only where the family needs
    # them (block-causal attention, which only the cached graphs compute)
    cache: bool | None = None
    target: str = "onnxruntime"  # what --moe auto picks the MoE form for
    block_length: int | None = None  # step rows; default: the sampler's block length
    window: int | None = None  # prefix-cache rows; default: the sampler's gen_length
    # how attention is lowered (export/onnx_attention.py); auto: by target and opset
    attention: str = "auto"
    requested_attention: str | None = None  # what --attention said, before auto was resolved

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise DllmExportError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.outputs not in OUTPUT_KINDS:
            raise DllmExportError(f"--outputs {self.outputs!r}: choose decode or logits")
        if self.moe not in EXPORT_STRATEGIES:
            raise DllmExportError(
                f"--moe {self.moe!r}: choose one of {', '.join(EXPORT_STRATEGIES)} "
                "(eager has data-dependent shapes and cannot be exported)")
        if self.target not in TARGETS:
            raise DllmExportError(f"--target {self.target!r}: choose onnxruntime or tensorrt")
        if self.attention not in ATTENTION_FORMS:
            raise DllmExportError(f"--attention {self.attention!r}: choose one of "
                                  f"{', '.join(ATTENTION_FORMS)}")
        check_at_least("--seq-len", self.seq_len, 2)
        check_at_least("--batch", self.batch)
        check_at_least("--moe-block", self.moe_block)
        check_at_least("--topk", self.topk, 2)
        if not 18 <= self.opset <= 24:
            raise DllmExportError(
                f"--opset {self.opset}: the torch.export-based exporter writes opsets 18 to 24")
        resolve_attention(self.attention, self.target, self.opset)  # refuse bad pairs now
        if self.topk < 2:
            raise DllmExportError("--topk must be at least 2 (margins need the runner-up)")
        for flag, value in (("--block-length", self.block_length), ("--window", self.window)):
            if value is not None and not 1 <= value < self.seq_len:
                raise DllmExportError(
                    f"{flag} {value}: must be at least 1 and below --seq-len {self.seq_len}")
        if (self.block_length or self.window) and self.cache is False:
            raise DllmExportError("--block-length and --window size the cached graphs: "
                                  "drop --no-cache")


def _needs_cache(family: str, options: ExportOptions) -> bool:
    """--cache resolved: on by default where the family does not attend bidirectionally."""
    rule = families.family(family).attention
    if rule == "bidirectional":
        return bool(options.cache or options.block_length or options.window)
    if options.cache is False:
        raise DllmExportError(
            f"--no-cache: {family} attends {rule.replace('_', '-')}, which only the cached "
            "graphs compute; drop --no-cache")
    return True


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


def _trace(module, example: tuple, spec, options: ExportOptions, has_moe: bool):
    """torch.onnx.export(dynamo=True) of ``module`` to ``spec``'s names, with the
    exporter's chatter kept off the terminal."""
    import torch

    table = {}
    if has_moe and options.moe == "ort":
        from dllm_export.export.onnx_moe import translation_table

        table.update(translation_table())
    fused = contextlib.nullcontext()
    if options.attention != "decomposed":
        from dllm_export.export.onnx_attention import translation_table
        from dllm_export.models.layers import trace_fused_attention

        table.update(translation_table(options.attention, options.opset))
        fused = trace_fused_attention()
    log = io.StringIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # onnxscript prints notes on both streams. onnx_ir logs "Attribute type is ambiguous" for
    # the exporter's empty attribute lists later, when the model is saved; its warnings carry
    # nothing a user can act on, so the exporter keeps it at ERROR from here on.
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            warnings.catch_warnings(), torch.no_grad(), fused:
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, example, None, dynamo=True, opset_version=options.opset,
                input_names=spec.input_names(), output_names=spec.output_names(),
                custom_translation_table=table or None, optimize=True, verbose=False,
            )
        except Exception as err:
            raise DllmExportError(
                f"torch.onnx.export failed ({spec.name} graph): {type(err).__name__}: "
                f"{str(err).splitlines()[0]}"
            ) from err
        finally:
            quiet.setLevel(level)
    return program


def _example(spec, dtype):
    """Zero inputs of ``spec``'s shapes (an all-visible mask, positions 0..Lq-1)."""
    import torch

    out = []
    for tensor in spec.inputs:
        if tensor.dtype == "bool":
            out.append(torch.ones(tensor.shape, dtype=torch.bool))
        elif tensor.name == "position_ids":
            out.append(torch.arange(tensor.shape[1]).expand(tensor.shape).contiguous())
        elif tensor.name == "head_rows":
            out.append(torch.arange(tensor.shape[0]))
        elif tensor.dtype == "int64":
            value = torch.ones if tensor.name == "attention_mask" else torch.zeros
            out.append(value(tensor.shape, dtype=torch.long))
        else:
            out.append(torch.zeros(tensor.shape, dtype=dtype))
    return tuple(out)


def _cached_specs(checkpoint, options: ExportOptions, defaults, special_count: int) -> dict:
    """The cached graphs' specs (contract.py) at this export's shapes."""
    from dllm_export.model_shape import model_shape

    shape = model_shape(checkpoint.config, checkpoint.family)
    entry = families.family(checkpoint.family)
    shift = int(entry.shift_logits)
    length = options.seq_len
    block = options.block_length or min(defaults.block_length or 32, length // 2)
    window = options.window or defaults.gen_length
    if max(block, window) + shift > length:
        raise DllmExportError(
            f"--block-length {block} / --window {window} (+{shift} for a shifted family) do "
            f"not fit --seq-len {length}")
    specs = {}
    for name in entry.cached_graphs:
        rows = contract.cached_rows(name, length, block, window, shift)
        specs[name] = contract.cached_graph(
            name, options.batch, rows, length, shape.layers, shape.kv_heads, shape.head_dim,
            TORCH_DTYPE_NAMES[options.dtype], options.topk, special_count, shape.cache_kinds())
    if entry.attention == "bidirectional" and options.outputs == "decode":
        # --cache none reads a block's rows of each full-canvas step (contract.py: rows)
        specs["rows"] = contract.rows_graph(options.batch, length, block, options.topk,
                                            special_count)
    return {"block_length": block, "window": window, "shift": shift, "specs": specs,
            "layers": shape.layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
            "kinds": [kind for kind, _, _ in shape.cache_kinds()]}


def token_rows(spec) -> int:
    """Token rows a graph's layers compute per sequence: its queries, or for the rows graph
    the whole canvas (its head alone runs on the chosen rows)."""
    return spec.inputs[0].shape[1]


def _export_cached(model, head, cached: dict, tmp: Path, options, has_moe, report) -> None:
    """Trace every cached graph and point its weights into model.onnx.data."""
    from dllm_export.export.passes import run_passes
    from dllm_export.export.shared_weights import WeightsFile
    from dllm_export.models import set_moe_strategy
    from dllm_export.models.head import CachedDenoiser, RowsDenoiser

    weights = WeightsFile(tmp / "model.onnx")
    dtype = _torch_dtype(options.dtype)
    blocks = getattr(model, "moe_blocks", lambda: [])()
    for name, spec in cached["specs"].items():
        report("trace", f"{name} graph, {spec.queries} query rows over {spec.capacity} slots")
        if blocks:
            form = moe_form(options, len(blocks[0].experts), blocks[0].top_k,
                            options.batch * token_rows(spec))
            set_moe_strategy(model, form["form"], form["block"])
        if name == "rows":
            module = RowsDenoiser(model, head)
        else:
            module = CachedDenoiser(model, head, cached["layers"], with_past=spec.capacity > 0)
        program = _trace(module, _example(spec, dtype), spec, options, has_moe)
        run_passes(program.model)
        program.save(str(tmp / spec.file), external_data=True)
        del program
        gc.collect()
        weights.adopt(tmp / spec.file)


def _manifest(checkpoint, options, special, tokenizer, model, canvas, defaults, cached) -> dict:
    entry = families.family(checkpoint.family)
    moe_blocks = getattr(model, "moe_blocks", lambda: [])()
    moe = None
    if moe_blocks:
        experts, top_k = len(moe_blocks[0].experts), moe_blocks[0].top_k
        rows = {"canvas": options.batch * options.seq_len}
        rows.update({name: options.batch * token_rows(spec)
                     for name, spec in (cached["specs"] if cached else {}).items()})
        graphs = {name: moe_form(options, experts, top_k, count) for name, count in rows.items()}
        # strategy and block: the canvas graph's; graphs: each graph's own
        moe = {"strategy": graphs["canvas"]["form"], "requested": options.requested_moe,
               "block": graphs["canvas"]["block"], "target": options.target,
               "experts": experts, "top_k": top_k, "graphs": graphs}
        if _ort_refused(options):
            moe["ort_refusal"] = options.moe_ort_refusal
    special_ids = [t for t in (special.eos_id, special.eot_id) if t is not None]
    cache = None
    if cached:
        cache = {
            "capacity": options.seq_len, "layout": contract.CACHE_LAYOUT,
            "kinds": cached["kinds"], "stored": "after RoPE",
            "dtype": TORCH_DTYPE_NAMES[options.dtype], "layers": cached["layers"],
            "kv_heads": cached["kv_heads"], "head_dim": cached["head_dim"],
            "block_length": cached["block_length"], "window": cached["window"],
            "shift": cached["shift"], "modes": list(entry.cache_modes),
            "default": entry.default_cache, "attention": entry.attention,
            "positions": entry.positions,
            "graphs": {name: spec.as_dict() for name, spec in cached["specs"].items()},
        }
    return {
        "format": "dllm-export",
        "format_version": 1,
        "contract_version": contract.CONTRACT_VERSION,
        "kind": "onnx",
        "family": checkpoint.family,
        "source": {"checkpoint": str(checkpoint.directory.resolve()),
                   "fingerprint": checkpoint.fingerprint(), "config": checkpoint.config},
        "graph": {"file": "model.onnx", "data": "model.onnx.data", "opset": options.opset},
        "shapes": {"batch": options.batch, "seq_len": options.seq_len},
        "dtype": options.dtype,
        "precision": options.dtype,
        "vocab_size": model_vocab(model),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "special_tokens": special.as_dict(),
        "special_ids": special_ids,
        "topk": options.topk,
        "outputs": options.outputs,
        "shift_logits": entry.shift_logits,
        "moe": moe,
        "attention": attention_manifest(options),
        "inputs": [asdict(t) for t in canvas.inputs],
        "output_specs": [asdict(t) for t in canvas.outputs],
        "cache": cache,
        "generation_defaults": asdict(defaults),
        "versions": _versions(),
        "validation": None,
        "trt_compatibility": None,
        "quantization": None,
        "valid": False,
    }


def attention_manifest(options: ExportOptions) -> dict:
    """The manifest's ``attention`` block: the form every graph was lowered to, and RoPE's."""
    return {"form": options.attention, "requested": options.requested_attention,
            "target": options.target, "rope": rope_form(options.attention, options.opset)}


def model_vocab(model) -> int:
    args = model.args
    return getattr(args, "embedding_size", None) or args.vocab_size


def export_model(model_dir, out_dir, options: ExportOptions, report=None) -> dict:
    """Export ``model_dir`` to ``out_dir``; returns the manifest. ``report(stage, detail)``
    receives progress. Raises DllmExportError when validation fails (after writing)."""
    from dllm_export.checkpoint import open_checkpoint, resolve_special_tokens
    from dllm_export.export.trt_lint import lint_artifact
    from dllm_export.export.validate import run_validation
    from dllm_export.models import load_model, set_moe_strategy
    from dllm_export.models.head import DecodeHead, Denoiser
    from dllm_export.runtime.api import sampler_defaults
    from dllm_export.runtime.backends.onnxruntime import OrtBackend
    from dllm_export.runtime.backends.torch_backend import TorchBackend
    from dllm_export.runtime.tokenizer import TextTokenizer, copy_tokenizer_files

    report = report or (lambda stage, detail="": None)
    out_dir = Path(out_dir)
    check_output(out_dir, (model_dir,), options.overwrite)  # before anything loads
    checkpoint = open_checkpoint(model_dir)
    options = dataclasses.replace(
        options, cache=_needs_cache(checkpoint.family, options), requested_attention=options.attention,
        attention=resolve_attention(options.attention, options.target, options.opset))
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

    if options.topk > tokenizer.vocab_size:
        raise DllmExportError(
            f"--topk {options.topk}: exceeds the vocabulary of {tokenizer.vocab_size} tokens")
    model, _ = load_model(model_dir, dtype=_torch_dtype(options.dtype), progress=on_tensor)
    blocks = getattr(model, "moe_blocks", lambda: [])()
    has_moe = bool(blocks)
    if has_moe:
        experts, top_k = len(blocks[0].experts), blocks[0].top_k
        refusal = next((r for r in (b.ort_refusal() for b in blocks) if r), None)
        options = dataclasses.replace(options, requested_moe=options.moe,
                                      moe_ort_refusal=refusal)
        canvas_moe = moe_form(options, experts, top_k, options.batch * options.seq_len)
        options = dataclasses.replace(options, moe=canvas_moe["form"])
        why = f"; not ort: {refusal}" if _ort_refused(options) else ""
        report("moe", f"{options.moe} form for {experts} experts (--moe {options.requested_moe},"
                      f" --target {options.target}{why})")
        set_moe_strategy(model, canvas_moe["form"], canvas_moe["block"])
    special_ids = tuple(t for t in (special.eos_id, special.eot_id) if t is not None)
    head = DecodeHead(options.topk, special_ids) if options.outputs == "decode" else None
    canvas = contract.canvas_graph(options.batch, options.seq_len, options.topk,
                                   len(special_ids), model_vocab(model), options.outputs)
    report("trace", f"torch.onnx.export dynamo, opset {options.opset}, [{options.batch}, {options.seq_len}]")
    program = _trace(Denoiser(model, head), _example(canvas, None), canvas, options, has_moe)
    from dllm_export.export.passes import run_passes, write_logits_graph

    run_passes(program.model)
    defaults = fit_generation_defaults(
        sampler_defaults(checkpoint.family, checkpoint.generation_config), options.seq_len)
    cached = _cached_specs(checkpoint, options, defaults, len(special_ids)) if options.cache else None
    if cached and "draft" in cached["specs"]:  # draft-and-verify drafts the exported block
        defaults = dataclasses.replace(defaults, block_length=cached["block_length"])
    manifest = _manifest(checkpoint, options, special, tokenizer, model, canvas, defaults, cached)
    with atomic_directory(out_dir, overwrite=options.overwrite, inputs=(model_dir,)) as tmp:
        report("save", "model.onnx + external data")
        program.save(str(tmp / "model.onnx"), external_data=True)
        del program
        gc.collect()
        if options.outputs == "decode":
            write_logits_graph(tmp / "model.onnx", tmp / LOGITS_GRAPH)
            manifest["graph"]["logits_file"] = LOGITS_GRAPH
        if cached:
            _export_cached(model, DecodeHead(options.topk, special_ids), cached, tmp, options,
                           has_moe, report)
        copy_tokenizer_files(model_dir, tmp)
        report("check-trt", "TensorRT operator support")
        manifest["trt_compatibility"] = lint_artifact(tmp, manifest)
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
        manifest["files"] = record_files(tmp)
        write_json(tmp / "manifest.json", manifest)
    if not manifest["valid"]:
        raise DllmExportError(f"{out_dir}: {validation_failure(manifest['validation'])}")
    return manifest


def validation_failure(validation: dict) -> str:
    """One line naming every failing case and the check it missed."""
    failed = [f"{r['case']}: {'; '.join(r['failed'])}" for r in validation["results"]
              if r.get("failed")]
    return (f"validation against PyTorch failed ({' | '.join(failed)}); the artifact is "
            "marked invalid")


def validate_artifact(artifact_dir, model_dir=None, report=None) -> dict:
    """Rerun the validation of an artifact against its source checkpoint (or ``model_dir``)
    and record the result in its manifest."""
    from dllm_export.export.validate import run_validation
    from dllm_export.integrity import verify_files
    from dllm_export.jsonio import read_json
    from dllm_export.models import load_model
    from dllm_export.runtime.artifact import refuse_own_layout
    from dllm_export.runtime.backends.onnxruntime import OrtBackend
    from dllm_export.runtime.backends.torch_backend import TorchBackend

    report = report or (lambda stage, detail="": None)
    artifact_dir = Path(artifact_dir)
    manifest = read_json(artifact_dir / "manifest.json", "the artifact manifest")
    if manifest.get("family") == "diffusion-gemma":  # its own graphs: export/diffusion_gemma.py
        from dllm_export.export.diffusion_gemma import revalidate

        return revalidate(artifact_dir, manifest, model_dir, report)
    refuse_own_layout(manifest, artifact_dir, "validate")
    report("verify", "every file against its recorded sha256")
    verify_files(artifact_dir, manifest, full=True)
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
