"""Quantisation on ONNX Runtime CPU: step latency and size on disk of INT8 and INT4 against
the fp32 artifact, and the time and peak memory of quantising.

    python -m benchmarks.bench_quantize --work out/bench-quant            # a ~60M MoE model
    python -m benchmarks.bench_quantize --work out/bench --one-b          # the ~1B checkpoint

Every quantisation and every latency measurement runs in its own process, one after
another (benchmarks/_common.py). The ~1B run uses bench_memory's generated checkpoint,
exported with ``--moe dense``. Both runs use 8 forward-process calibration states from a text
file (the float model's own answers would cost a full generation each) and no gate: they
measure what quantising costs, not quality (docs/quantization.md has the quality figures).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks._common import current_rss_bytes, emit, peak_rss_bytes, run_isolated

# A LLaDA-MoE layout of ~60M parameters: big enough that the weights dominate latency.
MEDIUM = {
    "hidden_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "expert_intermediate_size": 512,
    "dense_intermediate_size": 2048,
    "moe_layer_freq": [1] * 6,
    "vocab_size": 8192,
}
CALIBRATION_TEXT = "\n\n".join(
    "The denoiser predicts every masked position of the canvas at once, and the sampler "
    f"commits the most confident ones; step {i} of a worked example follows. "
    "def add(a, b): return a + b. 12 + 34 = 46. Sort 5 3 9 1 gives 1 3 5 9."
    for i in range(16)
)


def quantize_worker(
    artifact: str,
    out: str,
    precision: str,
    method: str,
    calib: str,
    samples: int,
):
    from dllm_export.calibration.quantize import QuantizeOptions, quantize_artifact

    baseline = current_rss_bytes()
    started = time.perf_counter()
    manifest = quantize_artifact(
        artifact,
        out,
        QuantizeOptions(
            precision=precision,
            method=method,
            calib=calib or None,
            samples=samples,
            calib_mode="forward",
            gate=False,  # speed and memory only; quality is compare_quantize's job
            overwrite=True,
        ),
    )
    emit(
        {
            "stage": "quantize",
            "precision": precision,
            "method": method,
            "seconds": round(time.perf_counter() - started, 1),
            "baseline_rss_mb": round(baseline / 2**20, 1),
            "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
            "valid": manifest["valid"],
            "quantized_nodes": manifest["quantization"]["quantized_nodes"],
        }
    )


def size_mb(directory: Path) -> float:
    return round(sum(p.stat().st_size for p in directory.glob("model.onnx*")) / 1e6, 2)


def make_artifact(work: Path, one_b: bool, seq_len: int) -> Path:
    from dllm_export.export.onnx import ExportOptions, export_model
    from dllm_export.models.tiny import make_tiny

    if one_b:
        from benchmarks.bench_memory import make_checkpoint

        checkpoint = make_checkpoint(work)
    else:
        checkpoint = work / "llada-moe-medium"
        if not (checkpoint / "config.json").is_file():
            make_tiny(
                "llada-moe",
                checkpoint,
                dtype="float32",
                shards=1,
                overrides=MEDIUM,
                overwrite=True,
            )
    artifact = work / f"{checkpoint.name}-dense-{seq_len}"
    if not (artifact / "manifest.json").is_file():
        export_model(
            checkpoint,
            artifact,
            ExportOptions(
                seq_len=seq_len, moe="dense", validate=not one_b, overwrite=True
            ),
        )
    return artifact


def export_worker(work: str, one_b: str, seq_len: str):
    started = time.perf_counter()
    artifact = make_artifact(Path(work), one_b == "1b", int(seq_len))
    emit(
        {
            "stage": "export",
            "artifact": str(artifact),
            "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        }
    )


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "export-worker":
        return export_worker(*sys.argv[2:5])
    if len(sys.argv) > 1 and sys.argv[1] == "quantize-worker":
        return quantize_worker(*sys.argv[2:7], int(sys.argv[7]))
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("out/bench-quant"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--one-b", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # The export runs in its own process too, so this one never holds the weights.
    exported = run_isolated(
        "benchmarks.bench_quantize",
        "export-worker",
        str(args.work),
        "1b" if args.one_b else "medium",
        str(args.seq_len),
    )
    emit(exported)
    artifact = Path(exported["artifact"])
    calib = args.work / "calibration.txt"
    calib.write_text(CALIBRATION_TEXT)
    results = {
        "benchmark": "quantize",
        "artifact": str(artifact),
        "fp32_mb": size_mb(artifact),
    }
    runs = [("int8", "minmax"), ("int4", "nbits")]
    if not args.one_b:
        runs.insert(1, ("int8", "nbits"))
    for precision, method in runs:
        out = args.work / f"{artifact.name}-{precision}-{method}"
        record = run_isolated(
            "benchmarks.bench_quantize",
            "quantize-worker",
            str(artifact),
            str(out),
            precision,
            method,
            str(calib),
            "8",
        )
        record["size_mb"] = size_mb(out)
        emit(record)
        results[f"{precision}-{method}"] = record
    if not args.one_b:
        for name in ("fp32", "int8-minmax", "int8-nbits", "int4-nbits"):
            path = (
                artifact
                if name == "fp32"
                else args.work / f"{artifact.name}-{name.replace('-', '-', 1)}"
            )
            step = run_isolated(
                "benchmarks.worker",
                "ort",
                str(path),
                "--threads",
                str(args.threads),
                "--no-generate",
            )
            results.setdefault("latency", {})[name] = {
                **step["step"],
                "size_mb": size_mb(path),
            }
            emit({"stage": "latency", "name": name, **step})
    emit(results)


if __name__ == "__main__":
    main()
