"""``quantize``: a float artifact in, a quantised artifact out, judged by the quality gate.

Steps: read the float artifact's manifest (it must be valid fp32), pick the method for the
precision and target profile, collect calibration states (``collect.py``; for the cached
graphs, the states cached decoding feeds them: ``cached_states.py``), rewrite Gemm as
MatMul (``ort_backend.prepare_graph``), quantise the selected linear layers of every graph
with ONNX Runtime or ModelOpt (the cached graphs' weights shared with the canvas graph's),
write the logits variant, lint Q/DQ graphs for TensorRT, run the gate against the float
artifact (cached decoding against cached decoding too), and write the manifest. The directory appears only when
complete; a candidate that misses a bar is written with ``"valid": false`` and the command
fails, unless the bars are overridden.
"""

from __future__ import annotations

import copy
import gc
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from dllm_export.calibration import methods as method_table
from dllm_export.calibration.gate import DEFAULT_BARS, GateSettings
from dllm_export.calibration.recipes import Recipe, select_nodes
from dllm_export.errors import DllmExportError
from dllm_export.integrity import record_files
from dllm_export.jsonio import atomic_directory, check_output, write_json

WORK = ".work"  # scratch folder inside the partial output, removed before it is renamed


@dataclass
class QuantizeOptions:
    precision: str = "int8"
    method: str | None = None  # None: the default for the precision and target
    calib: str | None = None  # a .txt/.jsonl path or a source name; None: built in
    samples: int = 32  # calibration states (4 generations for prompts without answers)
    calib_mode: str = "mixed"  # "mixed", "forward" or "trajectory"
    exclude: tuple[str, ...] = ()
    quantize_router: bool = False
    quantize_head: bool = False  # --quantize-head: the decode head too
    profile: str | None = None  # target device profile (name or path)
    # library only (benchmarks): MatMulNBits accuracy_level; None: the profile's, else 4
    nbits_accuracy_level: int | None = None
    bars: dict = field(
        default_factory=dict
    )  # GateBars overrides, e.g. {"min_agreement": 0.8}
    gate_samples: int = 16  # held-out problems per task in the gate
    gate_mc_num: int = 16  # Monte-Carlo copies per sequence for the gate's ELBO
    gate: bool = True
    install_modelopt: bool = False
    overwrite: bool = False


def _family(artifact_dir: Path) -> str | None:
    from dllm_export.jsonio import read_json

    path = artifact_dir / "manifest.json"
    return read_json(path).get("family") if path.is_file() else None


def _check_source(artifact_dir: Path, manifest: dict) -> None:
    if manifest.get("kind") != "onnx":
        raise DllmExportError(
            f"{artifact_dir}: quantize takes an ONNX artifact (kind onnx), "
            f"not {manifest.get('kind')!r}"
        )
    if manifest.get("precision") != "fp32" or manifest.get("quantization"):
        raise DllmExportError(
            f"{artifact_dir}: precision {manifest.get('precision')!r}; quantize an fp32 "
            "export (dllm-export export --dtype fp32)"
        )


def _check_moe(artifact_dir: Path, manifest: dict, method) -> None:
    """Expert weights must be reachable: 2-D MatMuls (``--moe dense``) for every method, or
    ``com.microsoft::MoE`` nodes (``--moe ort``) for the QMoE method."""
    strategy = (manifest.get("moe") or {}).get("strategy")
    if method.format == "qmoe" and strategy != "ort":
        raise DllmExportError(
            f"--method qmoe converts com.microsoft::MoE nodes; {artifact_dir} has none "
            "(export with --moe ort, or choose another method)"
        )
    if strategy == "sparse":
        raise DllmExportError(
            f"{artifact_dir}: exported with --moe sparse, whose expert weights are gathered "
            "per block at run time where no quantiser reaches them; re-export with --moe "
            "dense (or --moe ort for ONNX Runtime's QMoE)"
        )
    if strategy == "ort" and method.format != "qmoe":
        raise DllmExportError(
            f"{artifact_dir}: exported with --moe ort, whose experts only QMoE quantises; "
            "use --method qmoe (ONNX Runtime), or re-export with --moe dense for Q/DQ"
        )


def _target(options: QuantizeOptions):
    if options.profile is None:
        return None
    from dllm_export.device_profiles import load_profile
    from dllm_export.precision import check_precision

    profile = load_profile(options.profile)
    check_precision(profile, options.precision)
    return profile


def _with_accuracy_level(options: QuantizeOptions, profile) -> QuantizeOptions:
    """MatMulNBits' accuracy_level: the option, else the target profile's measured one,
    else int8 arithmetic (4)."""
    from dataclasses import replace

    from dllm_export.calibration.ort_backend import NBITS_ACCURACY_LEVEL
    from dllm_export.device_profiles import NBITS_ACCURACY_LEVELS

    level = options.nbits_accuracy_level
    if level is None and profile is not None:
        level = profile.nbits_accuracy_level
    level = NBITS_ACCURACY_LEVEL if level is None else level
    if level not in NBITS_ACCURACY_LEVELS:
        raise DllmExportError(f"nbits_accuracy_level {level!r}: choose one of "
                              f"{', '.join(map(str, NBITS_ACCURACY_LEVELS))}")
    return replace(options, nbits_accuracy_level=level)


def runs_on(method, precision: str) -> list[str]:
    """Shipped device profiles whose device and engine library run this artifact."""
    from dllm_export.device_profiles import all_profiles

    return [
        p.name
        for p in all_profiles()
        if precision in p.precisions and p.engine_library in method.libraries
    ]


def _versions(backend_report: dict) -> dict:
    out = {}
    for package in ("dllm-export", "onnx", "onnxruntime"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if backend_report.get("modelopt"):
        out["nvidia-modelopt"] = backend_report["modelopt"]
    return out


@dataclass
class _GraphJob:
    """What quantising one graph needs besides the graph and its nodes."""

    batch: int  # the artifact's fixed batch
    all_linear: list[str]  # every MatMul (ModelOpt excludes those not selected)
    accuracy_level: int  # MatMulNBits
    report: object = None  # progress(stage, detail)


def _quantize_graph(method, prepared: Path, out: Path, nodes, calibration,
                    job: _GraphJob) -> dict:
    from dllm_export.calibration import ort_backend

    batch, all_linear, accuracy_level = job.batch, job.all_linear, job.accuracy_level
    states = calibration.states if calibration else []
    if method.backend == "modelopt":
        from dllm_export.calibration.modelopt_backend import run_modelopt

        raw = prepared.with_name("modelopt.onnx")
        exclude = [n for n in all_linear if n not in nodes]
        report = run_modelopt(
            prepared,
            raw,
            method.precision,
            method.backend_method,
            states,
            batch,
            exclude,
        )
        import onnx

        ort_backend.save_model(onnx.load(str(raw), load_external_data=True), out)
        return report
    bits = 4 if method.precision == "int4" else 8
    if method.format == "qmoe":
        import onnx

        from dllm_export.calibration.qmoe import moe_to_qmoe

        model = onnx.load(str(prepared), load_external_data=True)
        moe_to_qmoe(model, bits, prepared.parent)
        experts = prepared.with_name("qmoe.onnx")
        ort_backend.save_model(model, experts)
        del model
        ort_backend.weight_only_nbits(experts, out, nodes, bits,
                                      accuracy_level=accuracy_level)
        return {"experts": "QMoE per-row", "other_linear_layers": "MatMulNBits",
                "accuracy_level": accuracy_level}
    if method.format in ("nbits", "dq"):
        ort_backend.weight_only_nbits(prepared, out, nodes, bits,
                                      accuracy_level=accuracy_level,
                                      dequantize_blocks=method.format == "dq")
        return {"accuracy_level": accuracy_level} if method.format == "nbits" else {}
    else:
        ort_backend.int8_qdq(prepared, out, nodes, states, batch, method.backend_method,
                             progress=job.report)
    return {}


def _block_causal(manifest: dict) -> bool:
    """Decoded only through the cached graphs (runtime/cache.py: the canvas graph attends
    bidirectionally)."""
    return (manifest.get("cache") or {}).get("attention", "bidirectional") != "bidirectional"


def _candidate_backend(directory: Path, manifest: dict, logits_file: str):
    import onnx

    from dllm_export.calibration.evalgraph import GraphBackend, fake_quant_fp8, has_fp8

    model = onnx.load(str(directory / logits_file), load_external_data=False)
    note = None
    if has_fp8(model):
        model = fake_quant_fp8(model, directory)
        note = (
            "fake-quantised: Q/DQ pairs to float8 e4m3 replaced by e4m3 rounding in "
            "float32 (ONNX Runtime CPU has no FP8 kernels); judge the engine on a GPU"
        )
    return GraphBackend(model, directory, manifest), note


def _require_modelopt(method, install: bool, report) -> None:
    from dllm_export.calibration import modelopt_backend

    if install and modelopt_backend.unavailable_reason():
        modelopt_backend.install_env(report)
    reason = modelopt_backend.unavailable_reason()
    if reason:
        raise DllmExportError(f"--method {method.name} needs ModelOpt: {reason}")


def _write_graph(
    tmp: Path, artifact_dir: Path, source, method, options, calibration, report
):
    """The quantised ``model.onnx`` (+ data), its logits variant and the tokenizer files
    in ``tmp``. Returns (selection, backend report)."""
    import onnx

    from dllm_export.calibration.ort_backend import prepare_graph
    from dllm_export.export.passes import write_logits_graph
    from dllm_export.runtime.tokenizer import copy_tokenizer_files

    work = tmp / WORK
    work.mkdir()
    report("prepare", "Gemm -> MatMul")
    prepared = work / "prepared.onnx"
    prepare_graph(artifact_dir / source["graph"]["file"], prepared)
    model = onnx.load(str(prepared), load_external_data=False)
    recipe = Recipe(
        tuple(options.exclude), options.quantize_router, options.quantize_head
    )
    selection = select_nodes(model, recipe)
    all_linear = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    del model
    if not selection.quantize:
        raise DllmExportError("--exclude left no linear layer to quantise")
    report("quantize", f"{method.key}: {len(selection.quantize)} linear layers")
    job = _GraphJob(source["shapes"]["batch"], all_linear, options.nbits_accuracy_level,
                    report)
    backend_report = _quantize_graph(method, prepared, tmp / "model.onnx",
                                     selection.quantize, calibration, job)
    shutil.rmtree(work)
    gc.collect()
    write_logits_graph(tmp / "model.onnx", tmp / "model_logits.onnx")
    copy_tokenizer_files(artifact_dir, tmp)
    return selection, backend_report


def _graph_fields(tmp: Path, method, manifest: dict, backend_report: dict) -> dict:
    """Manifest fields that describe the written graphs; Q/DQ graphs must lint clean."""
    import onnx

    from dllm_export.export.trt_lint import lint_artifact

    # what the float artifact already had (an --target onnxruntime export's fused attention,
    # its MoE op) is not the quantiser's doing; anything new in a Q/DQ graph is
    inherited = {f["op"] for f in (manifest.get("trt_compatibility") or {}).get("findings", [])}
    compatibility = lint_artifact(tmp, manifest)
    errors = [f for f in compatibility["findings"]
              if f["severity"] == "error" and f["op"] not in inherited]
    if method.format in ("qdq", "dq") and errors:
        raise DllmExportError(
            f"the {method.key} {errors[0]['graph']} graph fails check-trt "
            f"({errors[0]['node']}: {errors[0]['reason']}); this is a bug, please report it"
        )
    opsets = onnx.load(str(tmp / "model.onnx"), load_external_data=False).opset_import
    return {
        "graph": {
            "file": "model.onnx",
            "data": "model.onnx.data",
            "opset": next(o.version for o in opsets if o.domain in ("", "ai.onnx")),
            "logits_file": "model_logits.onnx",
        },
        "trt_compatibility": compatibility,
        "versions": {**manifest.get("versions", {}), **_versions(backend_report)},
    }


def _write_cached_graphs(tmp: Path, artifact_dir: Path, source: dict, method, options,
                         calibration, report) -> dict:
    """Every cached graph quantised like the canvas graph (its own calibration states for
    Q/DQ), its weights pointed into model.onnx.data. Returns per-graph node counts."""
    import onnx

    from dllm_export.calibration import ort_backend
    from dllm_export.export.shared_weights import WeightsFile

    work = tmp / WORK
    work.mkdir()
    weights = WeightsFile(tmp / "model.onnx")
    recipe = Recipe(tuple(options.exclude), options.quantize_router, options.quantize_head)
    counts = {}
    for name, spec in source["cache"]["graphs"].items():
        prepared = work / f"{name}.onnx"
        ort_backend.prepare_graph(artifact_dir / spec["file"], prepared)
        model = onnx.load(str(prepared), load_external_data=False)
        nodes = select_nodes(model, recipe).quantize
        del model
        report("quantize", f"{name} graph: {len(nodes)} linear layers")
        out = tmp / spec["file"]
        if method.format == "qdq":
            feeds = calibration.cached[name]
            if not feeds:
                raise DllmExportError(
                    f"no calibration states reached the {name} graph; pass more --samples")
            ort_backend.int8_qdq(prepared, out, nodes, [], source["shapes"]["batch"],
                                 method.backend_method,
                                 reader=ort_backend.FeedsReader(feeds, report))
        else:
            _quantize_graph(method, prepared, out, nodes, None,
                            _GraphJob(source["shapes"]["batch"], [],
                                      options.nbits_accuracy_level))
        weights.adopt(out)
        counts[name] = len(nodes)
    shutil.rmtree(work)
    return counts


def _calibrate(artifact_dir: Path, source: dict, options, report):
    """Calibration states from the float artifact, whose sessions are released after (a
    large model's weights should not stay resident while the quantiser loads its own)."""
    from dllm_export.calibration.collect import collect
    from dllm_export.eval.models import EvalModel

    float_model = EvalModel.open(artifact_dir)
    # Dense MoE graphs run every expert on every token: all of them get statistics.
    experts = (source.get("moe") or {}).get("experts")
    calibration = collect(
        artifact_dir,
        source,
        float_model.generator.backend,
        float_model.generator,
        options.calib,
        options.samples,
        options.calib_mode,
        experts,
        report,
        cached=bool(source.get("cache")),
    )
    float_model.close()
    del float_model
    gc.collect()
    return calibration


def _gate(tmp: Path, manifest, artifact_dir, options, bars, path: str, report) -> dict:
    from dllm_export.calibration.collect import is_task_model
    from dllm_export.calibration.gate import candidate_model, run_gate
    from dllm_export.eval.models import EvalModel

    float_model = EvalModel.open(artifact_dir)
    if _block_causal(manifest):  # generation runs through the cached graphs only
        from dllm_export.runtime.backends.onnxruntime import OrtBackend

        candidate, note = OrtBackend(tmp, manifest, logits=True), None
    else:
        candidate, note = _candidate_backend(tmp, manifest, "model_logits.onnx")
    settings = GateSettings(
        samples=options.gate_samples,
        mc_num=options.gate_mc_num,
        judge_tasks=is_task_model(manifest),
    )
    verdict = run_gate(
        float_model,
        candidate_model(candidate, float_model, path, options.precision),
        bars,
        settings,
        progress=report,
    )
    verdict["evaluation"] = note or "ONNX Runtime CPU on the quantised graph"
    candidate.close()
    if manifest.get("cache") and not _block_causal(manifest):
        from dllm_export.calibration.gate import run_cached_gate
        from dllm_export.runtime.backends.onnxruntime import OrtBackend

        cached = OrtBackend(tmp, manifest, logits=True)
        run_cached_gate(verdict, float_model,
                        candidate_model(cached, float_model, path, options.precision),
                        bars, settings, progress=report)
        cached.close()
    float_model.close()
    return verdict


def quantize_artifact(
    artifact_dir, out_dir, options: QuantizeOptions, report=None
) -> dict:
    """Quantise the fp32 artifact ``artifact_dir`` into ``out_dir``; returns the manifest.

    ``report(stage, detail)`` receives progress. Raises DllmExportError (after writing the
    artifact marked invalid) when the quality gate fails.
    """
    from dllm_export.runtime.artifact import read_manifest

    report = report or (lambda stage, detail="": None)
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    if _family(artifact_dir) == "diffusion-gemma":  # its own graphs, states and gate
        from dllm_export.calibration.diffusion_gemma import quantize_gemma

        return quantize_gemma(artifact_dir, out_dir, options, report)
    calib_path = Path(options.calib) if options.calib and Path(options.calib).exists() else None
    check_output(out_dir, (artifact_dir, calib_path), options.overwrite)
    if options.samples < 1:
        raise DllmExportError("--samples must be at least 1")
    source = read_manifest(artifact_dir, "quantize")
    _check_source(artifact_dir, source)
    profile = _target(options)
    strategy = (source.get("moe") or {}).get("strategy")
    method = method_table.resolve_method(
        options.precision,
        options.method or ("qmoe" if strategy == "ort" else None),
        profile.engine_library if profile else None,
    )
    _check_moe(artifact_dir, source, method)
    options = _with_accuracy_level(options, profile)
    bars = DEFAULT_BARS[options.precision].updated(**options.bars)
    if _block_causal(source) and method.backend == "modelopt":
        raise DllmExportError(
            f"--method {method.name}: ModelOpt quantises the canvas graph only, and "
            f"{source['family']} decodes through the cached graphs; use an ONNX Runtime "
            "method (minmax, nbits, qmoe)")
    if method.backend == "modelopt":
        _require_modelopt(method, options.install_modelopt, report)
    calibration = (
        _calibrate(artifact_dir, source, options, report) if method.calibrated else None
    )
    manifest = copy.deepcopy(source)
    cached_note = None
    if source.get("cache") and method.backend == "modelopt":
        manifest["cache"] = None  # the ModelOpt worker quantises the canvas graph only
        cached_note = ("not quantised: the ModelOpt path quantises the canvas graph only; "
                       "use an ONNX Runtime method for cached decoding")
    with atomic_directory(out_dir, overwrite=options.overwrite,
                          inputs=(artifact_dir, calib_path)) as tmp:
        selection, backend_report = _write_graph(
            tmp, artifact_dir, source, method, options, calibration, report
        )
        if manifest.get("cache"):
            cached_note = _write_cached_graphs(tmp, artifact_dir, source, method, options,
                                               calibration, report)
        manifest.update(_graph_fields(tmp, method, manifest, backend_report))
        report("kernels", "counting integer kernels in ONNX Runtime's optimised graph")
        from dllm_export.calibration.kernels import artifact_kernels

        kernels = None if method.precision == "fp8" else artifact_kernels(tmp, manifest)
        manifest["precision"] = options.precision
        manifest["quantization"] = {
            "method": method.name,
            "backend": method.backend,
            "format": method.format,
            "precision": options.precision,
            "backend_report": backend_report,
            "source_artifact": {
                "path": str(artifact_dir.resolve()),
                "fingerprint": source["source"]["fingerprint"],
            },
            "quantized_nodes": len(selection.quantize),
            "kernels": kernels,
            "cached_graphs": cached_note,
            "excluded": selection.excluded,
            "calibration": calibration.summary if calibration else None,
            "runs_on": runs_on(method, options.precision),
            "target_profile": profile.name if profile else None,
        }
        manifest["quality_gate"] = None
        if options.gate:
            manifest["quality_gate"] = _gate(
                tmp, manifest, artifact_dir, options, bars, str(out_dir), report
            )
        manifest["valid"] = not options.gate or manifest["quality_gate"]["passed"]
        manifest["files"] = record_files(tmp)
        write_json(tmp / "manifest.json", manifest)
    if not manifest["valid"]:
        failed = [c for c in manifest["quality_gate"]["checks"] if not c["passed"]]
        shown = "; ".join(
            f"{c['name']} {c['value']:.4f} vs bar {c['bar']}" for c in failed
        )
        raise DllmExportError(
            f"{out_dir}: quality gate failed ({shown}); the artifact is "
            "marked invalid (override a bar if this is acceptable)"
        )
    return manifest
