"""``plan``: will a model fit a device, at which precision, sequence length and batch?

Works from a checkpoint's config.json alone (no weights needed) or from an artifact
(``manifest.json``: its config, family, shapes, precision and MoE strategy). ``build`` runs
the same check first.

Memory model (bytes on the device while an engine runs):

* weights: quantised matrices at the precision (``precision.MATRIX_BYTES``), the embedding,
  LM head, routers and norms at 16-bit (fp32 in an fp32 engine);
* activations: the peak over one layer's phases, since TensorRT reuses activation memory
  across layers. Attention: the residual and its normed copy, Q/K/V, scores and
  probabilities ``[B, H, L, L]`` (counted as materialised: fused kernels need less) and the
  attention output. MLP: residual, normed copy, gate, up and their product. MoE in the
  export's form: every token through each expert in turn ("dense", the exporter's
  default), token rows padded to blocks per expert plus the expert weights gathered per
  block ("sparse"), exactly the routed rows ("ort"). Decode head: the final hidden state,
  fp32 logits and fp32 log-probabilities ``[B, L, V]``. Plus the engine's I/O buffers;
* key/value cache (artifacts with the cached graphs, or ``--cache``): every layer's keys and
  values over the whole canvas at the activation precision (contract.py's layout);
* workspace: the profile's builder workspace limit, counted in full.

The roofline lines come from ``roofline.py``: a full canvas step, a cached block step over
the canvas, and one autoregressive token, so that plan and profile predict the same costs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from dllm_export.device_profiles import GIB, DeviceProfile, all_profiles
from dllm_export.errors import DllmExportError, check_at_least
from dllm_export.export.onnx import DEFAULT_MOE as DEFAULT_MOE_STRATEGY
from dllm_export.export.onnx import resolve_moe, sparse_block
from dllm_export.jsonio import read_json
from dllm_export.model_shape import ModelShape, model_shape
from dllm_export.precision import (
    FLOAT_PRECISIONS,
    activation_bytes,
    check_known,
    check_precision,
)
from dllm_export.roofline import (
    autoregressive_token,
    cached_step,
    denoiser_step,
    kv_cache_bytes,
    weight_bytes,
)

# The exporter's other defaults (export/onnx.py), for plans made from a config alone.
DEFAULT_TOPK, DEFAULT_SPECIALS, DEFAULT_BLOCK = 8, 2, 32


@dataclass(frozen=True)
class Workload:
    """What runs: the model, its canvas, and the graph's MoE and output choices."""

    shape: ModelShape
    batch: int
    seq_len: int
    moe_strategy: str = DEFAULT_MOE_STRATEGY
    moe_block: int | None = None  # None: per canvas, as the exporter picks
    outputs: str = "decode"
    topk: int = DEFAULT_TOPK
    specials: int = DEFAULT_SPECIALS
    cached: bool = False  # the cached graphs and their key/value cache
    target: str = "tensorrt"  # the engine library's side of --target
    block_length: int = DEFAULT_BLOCK  # rows of the cached step graph

    def at(self, seq_len: int) -> "Workload":
        return dataclasses.replace(self, seq_len=seq_len)

    @property
    def strategy(self) -> str:
        """The MoE form the export makes (``auto`` resolved as the exporter does for the
        device's engine library)."""
        return resolve_moe(self.moe_strategy, self.shape.experts, self.target,
                           self.batch * self.seq_len)

    @property
    def block(self) -> int:
        if self.moe_block:
            return self.moe_block
        return sparse_block(self.batch * self.seq_len, self.shape.experts_per_token,
                            self.shape.experts)


@dataclass(frozen=True)
class MemoryEstimate:
    precision: str
    weight_bytes: int
    activation_bytes: int
    workspace_bytes: int
    usable_bytes: int
    cache_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.activation_bytes + self.workspace_bytes
                + self.cache_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def as_dict(self) -> dict:
        return {"precision": self.precision, "weight_bytes": self.weight_bytes,
                "activation_bytes": self.activation_bytes, "cache_bytes": self.cache_bytes,
                "workspace_bytes": self.workspace_bytes, "total_bytes": self.total_bytes,
                "usable_bytes": self.usable_bytes, "fits": self.fits}


def moe_rows(tokens: int, work: Workload) -> int:
    """Token rows the MoE graph multiplies: padded blocks ("sparse"), every token once per
    expert in turn ("dense"), or exactly tokens x top-k (the fused "ort" op)."""
    shape = work.shape
    pairs = tokens * shape.experts_per_token
    if work.strategy == "sparse":
        block = work.block
        return math.ceil((pairs + shape.experts * (block - 1)) / block) * block
    if work.strategy == "dense":
        return tokens
    return pairs


def activation_peak(work: Workload, precision: str) -> int:
    """Peak activation bytes of one forward (see the module doc for the model)."""
    shape, act = work.shape, activation_bytes(precision)
    batch, length = work.batch, work.seq_len
    tokens = batch * length
    residual = 2 * tokens * shape.hidden * act  # the stream and its normed copy
    attention = residual + tokens * (2 * shape.q_width + 2 * shape.kv_width) * act
    attention += 2 * batch * shape.heads * length * length * act
    phases = [attention]
    if shape.dense_layers:
        phases.append(residual + 3 * tokens * shape.dense_intermediate * act)
    if shape.moe_layers:
        rows = moe_rows(tokens, work)
        moe = residual + rows * (shape.hidden + 3 * shape.expert_intermediate) * act
        moe += 3 * tokens * shape.shared_intermediate * act
        if work.strategy == "sparse":  # expert weights gathered per block of rows
            moe += rows // work.block * shape.expert_matrices() * act
        phases.append(moe)
    phases.append(tokens * shape.hidden * act + 2 * tokens * shape.vocab * 4)
    io = 2 * tokens * 8  # input_ids and attention_mask, int64
    if work.outputs == "logits":
        io += tokens * shape.vocab * 4
    else:
        io += tokens * (work.topk * 12 + 4 + work.specials * 4)
    return int(max(phases) + io)


def estimate(work: Workload, precision: str, profile: DeviceProfile) -> MemoryEstimate:
    return MemoryEstimate(
        precision=precision,
        weight_bytes=int(weight_bytes(work.shape, precision)),
        activation_bytes=activation_peak(work, precision),
        workspace_bytes=profile.build.workspace_bytes,
        usable_bytes=profile.usable_bytes,
        cache_bytes=int(kv_cache_bytes(work.shape, precision, work.batch, work.seq_len))
        if work.cached else 0,
    )


def longest_fitting_seq_len(work: Workload, precision: str, profile: DeviceProfile,
                            step: int = 32) -> int | None:
    """The longest canvas (a multiple of ``step``, below the requested one) that fits."""
    best = None
    low, high = 1, (work.seq_len - 1) // step
    while low <= high:  # activations grow with the length: bisect
        middle = (low + high) // 2
        if estimate(work.at(middle * step), precision, profile).fits:
            best, low = middle * step, middle + 1
        else:
            high = middle - 1
    return best


@dataclass
class PlanSource:
    """What ``plan`` was pointed at, normalised."""

    path: Path
    kind: str  # "config" or "artifact"
    family: str
    config: dict
    precision: str | None = None  # an artifact's fixed precision
    batch: int | None = None
    seq_len: int | None = None
    manifest: dict = field(default_factory=dict)


def read_source(path: str | Path) -> PlanSource:
    """A checkpoint directory (or its config.json) or an artifact / engine directory."""
    path = Path(path)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if (path / "manifest.json").is_file():
        manifest = read_json(path / "manifest.json")
        config = (manifest.get("source") or {}).get("config")
        if not isinstance(config, dict) or "family" not in manifest:
            raise DllmExportError(f"{path / 'manifest.json'}: no 'source.config' or 'family'; "
                                  "was it written by dllm-export export?")
        shapes = manifest.get("shapes") or {}
        if manifest["family"] == "diffusion-gemma":  # its own manifest (export/diffusion_gemma.py)
            shapes = {"batch": manifest.get("batch"), "seq_len": manifest.get("capacity")}
            manifest = {**manifest, "moe": {"strategy": manifest.get("moe")},
                        "precision": manifest.get("precision", "fp32"),
                        "cache": {"block_length": manifest.get("canvas_length")}}
        return PlanSource(path, "artifact", manifest["family"], config,
                          manifest.get("precision"), shapes.get("batch"), shapes.get("seq_len"),
                          manifest)
    if not (path / "config.json").is_file():
        raise DllmExportError(f"{path}: neither a checkpoint (config.json) nor an artifact "
                              "(manifest.json)")
    config = read_json(path / "config.json", "the model configuration")
    shape = model_shape(config, config_path=path / "config.json")
    return PlanSource(path, "config", shape.family, config)


def resolve_precision(artifact_precision: str | None, requested: str | None,
                      profile: DeviceProfile) -> str:
    """The engine precision: an artifact's own, except that an fp32 artifact may be built
    in fp16 or bf16 (the profile's choice by default); a config may be planned in any."""
    if requested is not None:
        check_known(requested)
    if artifact_precision is None:
        precision = requested or profile.build.precision
    elif artifact_precision == "fp32":
        precision = requested or profile.build.precision
        if precision not in FLOAT_PRECISIONS:
            raise DllmExportError(
                f"--precision {precision}: this artifact is fp32; quantise it first "
                f"(dllm-export quantize ARTIFACT -o OUT --precision {precision})")
    else:
        precision = requested or artifact_precision
        if precision != artifact_precision:
            raise DllmExportError(
                f"--precision {precision}: this artifact is already {artifact_precision}; "
                "its precision is fixed (quantise the fp32 artifact again to change it)")
    return check_precision(profile, precision)


@dataclass
class Plan:
    source: PlanSource
    profile: DeviceProfile
    work: Workload
    chosen: MemoryEstimate
    rows: list[MemoryEstimate]
    suggestions: list[str]
    notes: list[str]

    @property
    def fits(self) -> bool:
        return self.chosen.fits

    def as_dict(self) -> dict:
        shape, work = self.work.shape, self.work
        precision = self.chosen.precision
        step = denoiser_step(shape, self.profile, precision, work.batch, work.seq_len)
        block = cached_step(shape, self.profile, precision, work.batch, work.block_length,
                            work.seq_len)
        token = autoregressive_token(shape, self.profile, precision, work.batch, work.seq_len)
        return {
            "source": str(self.source.path), "source_kind": self.source.kind,
            "family": shape.family, "parameters": shape.total_parameters(),
            "profile": self.profile.name, "precision": self.chosen.precision,
            "batch": work.batch, "seq_len": work.seq_len, "fits": self.fits,
            "memory": self.chosen.as_dict(),
            "by_precision": [row.as_dict() for row in self.rows],
            "roofline": {"denoiser_step": step.as_dict(), "cached_step": block.as_dict(),
                         "cached_step_rows": work.block_length,
                         "autoregressive_token": token.as_dict(),
                         "autoregressive_tokens_per_step": step.floor_seconds
                         / token.floor_seconds,
                         "autoregressive_tokens_per_cached_step": block.floor_seconds
                         / token.floor_seconds},
            "suggestions": self.suggestions, "notes": self.notes,
        }


def _workload(source: PlanSource, profile: DeviceProfile, seq_len, batch,
              cache: bool = False, block_length: int | None = None) -> Workload:
    manifest = source.manifest
    if source.kind == "artifact":
        for flag, asked, fixed in (("--seq-len", seq_len, source.seq_len),
                                   ("--batch", batch, source.batch)):
            if asked is not None and asked != fixed:
                raise DllmExportError(
                    f"{flag} {asked}: the artifact {source.path} has fixed shapes "
                    f"(batch {source.batch}, seq_len {source.seq_len}); export it again to "
                    "plan another shape, or plan from the checkpoint")
    moe = manifest.get("moe") or {}
    return Workload(
        shape=model_shape(source.config, source.family, source.path / "config.json"),
        batch=source.batch or batch or profile.build.batch,
        seq_len=source.seq_len or seq_len or profile.build.seq_len,
        moe_strategy=moe.get("strategy", DEFAULT_MOE_STRATEGY),
        moe_block=moe.get("block"),
        outputs=manifest.get("outputs", "decode"),
        topk=manifest.get("topk", DEFAULT_TOPK),
        specials=len(manifest.get("special_ids", [0] * DEFAULT_SPECIALS)),
        cached=bool(manifest.get("cache")) or cache,
        target="onnxruntime" if profile.engine_library == "onnxruntime" else "tensorrt",
        block_length=(manifest.get("cache") or {}).get("block_length")
        or block_length or DEFAULT_BLOCK,
    )


def _gib(count: float) -> str:
    return f"{count / GIB:.2f} GiB"


def _suggestions(work: Workload, chosen: MemoryEstimate, rows, profile) -> list[str]:
    out = []
    smaller = [row for row in rows if row.fits and row.weight_bytes < chosen.weight_bytes]
    for row in sorted(smaller, key=lambda row: -row.weight_bytes):
        out.append(f"{row.precision} fits: {_gib(row.total_bytes)} of {_gib(row.usable_bytes)} "
                   f"at seq_len {work.seq_len} (dllm-export quantize ... --precision "
                   f"{row.precision})")
    shorter = longest_fitting_seq_len(work, chosen.precision, profile)
    if shorter:
        out.append(f"{chosen.precision} fits at seq_len {shorter} or shorter")
    else:
        out.append(f"no sequence length fits {chosen.precision}: the weights and workspace "
                   f"alone need {_gib(chosen.weight_bytes + chosen.workspace_bytes)}")
    if not profile.unified_memory and profile.engine_library != "onnxruntime":
        out.append("build --weight-streaming keeps part of the weights in host memory "
                   "(slower: they cross PCIe every step)")
    elsewhere = [other.name for other in all_profiles() if other.name != profile.name
                 and chosen.precision in other.precisions
                 and estimate(work, chosen.precision, other).fits]
    if elsewhere:
        out.append(f"{chosen.precision} at seq_len {work.seq_len} fits on: "
                   f"{', '.join(elsewhere)}")
    return out


def plan_model(source: str | Path, profile: DeviceProfile, precision: str | None = None,
               seq_len: int | None = None, batch: int | None = None, cache: bool = False,
               block_length: int | None = None) -> Plan:
    """Predict the memory of an engine and whether it fits the device.

    Args:
        source: a checkpoint directory (config.json is enough) or an artifact directory.
        profile: the target ``DeviceProfile``.
        precision: engine precision; default: the artifact's, or the profile's build
            precision for fp32 artifacts and configs.
        seq_len, batch: the canvas; default: the artifact's shapes or the profile's.
        cache, block_length: count the cached graphs' key/value cache (an artifact exported
            with --cache always does) and size the cached step's rows.
    """
    check_at_least("--seq-len", seq_len, 2)
    check_at_least("--batch", batch)
    check_at_least("--block-length", block_length)
    source = read_source(source)
    chosen_precision = resolve_precision(source.precision, precision, profile)
    work = _workload(source, profile, seq_len, batch, cache, block_length)
    rows = [estimate(work, p, profile) for p in profile.precisions]
    chosen = estimate(work, chosen_precision, profile)
    suggestions = [] if chosen.fits else _suggestions(work, chosen, rows, profile)
    notes = [
        "weights: matrices at the precision; embedding, LM head, routers and norms at 16-bit",
        "activations: one layer's peak with attention scores materialised, plus the fp32 "
        "decode head",
    ]
    if work.shape.moe_layers:
        step = work.at(work.block_length)
        notes.append(f"MoE graph form: {work.strategy}"
                     + (f" (block {work.block})" if work.strategy == "sparse" else "")
                     + (f"; the cached step's: {step.strategy}"
                        + (f" (block {step.block})" if step.strategy == "sparse" else "")
                        if work.cached else ""))
    if source.kind == "config":
        notes.append("planned from config.json: quantised precisions need dllm-export "
                     "quantize before build")
    if chosen.fits and profile.unified_memory and profile.engine_library != "onnxruntime":
        # the artifact's own weights; from a config, assume one stored at the engine precision
        graph_precision = source.precision or chosen.precision
        build_need = weight_bytes(work.shape, graph_precision) + chosen.total_bytes
        if build_need > profile.memory_gib * GIB:
            notes.append(f"building on the device holds the ONNX weights and the engine at "
                         f"once (about {_gib(build_need)}, more than the "
                         f"{profile.memory_gib:g} GiB there): add swap before building")
    return Plan(source, profile, work, chosen, rows, suggestions, notes)


def render_plan(plan: Plan, console) -> None:
    """The plan as a rich table, the verdict and what would fit instead."""
    from rich.table import Table

    work, chosen = plan.work, plan.chosen
    title = (f"{plan.source.path} ({work.shape.family}, {work.shape.total_parameters() / 1e9:.2f}B "
             f"parameters) on {plan.profile.name}, batch {work.batch}, seq_len {work.seq_len}")
    table = Table(title=title, title_justify="left")
    columns = ["precision", "weights", "activations", *(["kv cache"] if work.cached else []),
               "workspace", "total", "usable", "fits"]
    for column in columns:
        table.add_column(column, justify="left" if column == "precision" else "right")
    for row in plan.rows:
        style = "bold" if row.precision == chosen.precision else None
        cache = [_gib(row.cache_bytes)] if work.cached else []
        table.add_row(row.precision, _gib(row.weight_bytes), _gib(row.activation_bytes),
                      *cache, _gib(row.workspace_bytes), _gib(row.total_bytes),
                      _gib(row.usable_bytes), "[green]yes[/]" if row.fits else "[red]no[/]",
                      style=style)
    console.print(table)
    verdict = "[green]fits[/]" if plan.fits else "[bold red]does NOT fit[/]"
    console.print(f"{chosen.precision}: {verdict} ({_gib(chosen.total_bytes)} needed, "
                  f"{_gib(chosen.usable_bytes)} usable)")
    for line in plan.suggestions:
        console.print(f"  - {line}")
    roofline = plan.as_dict()["roofline"]
    step, block = roofline["denoiser_step"], roofline["cached_step"]
    console.print(
        f"step floor {step['floor_ms']:.2f} ms ({step['bound']}-bound: "
        f"{step['flops'] / 1e12:.2f} TFLOP, {step['bytes'] / 1e9:.2f} GB read); one step costs "
        f"about {roofline['autoregressive_tokens_per_step']:.1f} autoregressive tokens",
        style="dim")
    console.print(
        f"cached block step ({roofline['cached_step_rows']} rows over {work.seq_len} cached "
        f"slots) {block['floor_ms']:.2f} ms ({block['bound']}-bound), about "
        f"{roofline['autoregressive_tokens_per_cached_step']:.1f} autoregressive tokens: "
        "diffusion beats autoregressive decoding at more tokens per forward than that",
        style="dim")
    for note in plan.notes:
        console.print(f"note: {note}", style="dim")
