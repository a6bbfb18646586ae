"""Quantisation on ONNX Runtime CPU: step time of INT8 and INT4 against the fp32 artifact
(A/B interleaved in one process), integer-kernel coverage, size on disk, and the time and
peak memory of quantising.

    python -m benchmarks.bench_quantize --work out/bench-quant            # an ~82M LLaDA
    python -m benchmarks.bench_quantize --work out/bench-quant --family llada-moe
    python -m benchmarks.bench_quantize --work out/bench --one-b          # the ~1B checkpoint

Every quantisation runs in its own process, one after another (benchmarks/_common.py); the
step times are then taken in one process that holds every artifact's session: each round
times each artifact in turn (the minimum of ``--repeats`` forwards on a half-masked canvas),
and the ratio to fp32 is taken per round, so load from other work on the machine hits both
sides of a ratio alike. Reported: the min and median of the round ratios. INT4 runs once per
MatMulNBits ``accuracy_level`` in ``--levels`` (what ``profiles/*.yaml`` record). The
quantisations use 8 forward-process calibration states from a text file (the float model's
own answers would cost a full generation each) and no gate: they measure what quantising
costs, not quality (docs/quantization.md has the quality figures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks._common import current_rss_bytes, emit, peak_rss_bytes, run_isolated

# A LLaDA of ~82M parameters (57M in the 56 linear layers): big enough that the weights
# dominate the step.
LLADA_MEDIUM = {"d_model": 768, "n_heads": 12, "n_kv_heads": 12, "n_layers": 8,
                "mlp_hidden_size": 2048, "vocab_size": 16384, "embedding_size": 16384}
# A LLaDA-MoE layout of ~60M parameters.
MOE_MEDIUM = {
    "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
    "num_key_value_heads": 8, "num_experts": 8, "num_experts_per_tok": 2,
    "expert_intermediate_size": 512, "dense_intermediate_size": 2048,
    "moe_layer_freq": [1] * 6, "vocab_size": 8192,
}
SIZES = {"llada": LLADA_MEDIUM, "llada-moe": MOE_MEDIUM}
CALIBRATION_TEXT = "\n\n".join(
    "The denoiser predicts every masked position of the canvas at once, and the sampler "
    f"commits the most confident ones; step {i} of a worked example follows. "
    "def add(a, b): return a + b. 12 + 34 = 46. Sort 5 3 9 1 gives 1 3 5 9."
    for i in range(16)
)


def quantize_worker(artifact: str, out: str, precision: str, method: str, calib: str,
                    samples: str, level: str):
    from dllm_export.calibration.quantize import QuantizeOptions, quantize_artifact

    baseline = current_rss_bytes()
    started = time.perf_counter()
    manifest = quantize_artifact(
        artifact, out,
        QuantizeOptions(precision=precision, method=method, calib=calib or None,
                        samples=int(samples), calib_mode="forward",
                        nbits_accuracy_level=int(level) if level != "-" else None,
                        gate=False,  # speed and memory only: compare_quantize judges
                        overwrite=True))
    quant = manifest["quantization"]
    emit({"stage": "quantize", "precision": precision, "method": method,
          "accuracy_level": quant["backend_report"].get("accuracy_level"),
          "seconds": round(time.perf_counter() - started, 1),
          "baseline_rss_mb": round(baseline / 2**20, 1),
          "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
          "valid": manifest["valid"], "quantized_nodes": quant["quantized_nodes"],
          "kernels": quant["kernels"]["canvas"] if quant.get("kernels") else None})


def size_mb(directory: Path) -> float:
    return round(sum(p.stat().st_size for p in directory.glob("model.onnx*")) / 1e6, 2)


def make_artifact(work: Path, family: str, one_b: bool, seq_len: int) -> Path:
    from dllm_export.export.onnx import DEFAULT_MOE, ExportOptions, export_model
    from dllm_export.models.tiny import make_tiny

    if one_b:
        from benchmarks.bench_memory import make_checkpoint

        checkpoint = make_checkpoint(work)
    else:
        checkpoint = work / f"{family}-medium"
        if not (checkpoint / "config.json").is_file():
            make_tiny(family, checkpoint, dtype="float32", shards=1,
                      overrides=SIZES[family], overwrite=True)
    moe = family != "llada" or one_b
    artifact = work / f"{checkpoint.name}{'-dense' if moe else ''}-{seq_len}"
    if not (artifact / "manifest.json").is_file():
        export_model(checkpoint, artifact,
                     ExportOptions(seq_len=seq_len, moe="dense" if moe else DEFAULT_MOE,
                                   validate=not one_b, overwrite=True))
    return artifact


def export_worker(work: str, family: str, one_b: str, seq_len: str):
    started = time.perf_counter()
    artifact = make_artifact(Path(work), family, one_b == "1b", int(seq_len))
    emit({"stage": "export", "artifact": str(artifact),
          "seconds": round(time.perf_counter() - started, 1),
          "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1)})


def latency_worker(threads: str, rounds: str, repeats: str, *pairs: str):
    """Interleaved step times of ``name=artifact`` pairs; the first is the reference."""
    import numpy as np

    from dllm_export.runtime import Generator

    named = [pair.split("=", 1) for pair in pairs]
    backends = {name: Generator.from_artifact(path, threads=int(threads)) for name, path in named}
    reference = next(iter(backends.values()))
    seq_len = reference.backend.seq_len
    ids = np.random.default_rng(0).integers(0, 200, size=(1, seq_len))
    ids[:, seq_len // 2:] = reference.special.mask_id
    mask = np.ones_like(ids)
    top1 = {}
    for name, generator in backends.items():  # warm-up, and each one's top-1 predictions
        top1[name] = generator.backend.predict(ids, mask).topk_ids[..., 0]
    samples = {name: [] for name in backends}
    for _ in range(int(rounds)):
        for name, generator in backends.items():
            times = []
            for _ in range(int(repeats)):
                started = time.perf_counter()
                generator.backend.predict(ids, mask)
                times.append(1000 * (time.perf_counter() - started))
            samples[name].append(min(times))
    first = next(iter(backends))
    result = {}
    for name in backends:
        ratios = [a / b for a, b in zip(samples[name], samples[first], strict=True)]
        result[name] = {
            "step_ms_median": round(statistics.median(samples[name]), 1),
            "ratio_to_fp32_min": round(min(ratios), 3),
            "ratio_to_fp32_median": round(statistics.median(ratios), 3),
            "top1_agreement_with_fp32": round(float((top1[name] == top1[first]).mean()), 3),
        }
    emit({"stage": "latency", "seq_len": seq_len, "threads": int(threads),
          "rounds": int(rounds), "repeats": int(repeats), "steps": result})


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("out/bench-quant"))
    parser.add_argument("--family", choices=sorted(SIZES), default="llada")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--one-b", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="0,4",
                        help="MatMulNBits accuracy levels to measure for INT4")
    return parser.parse_args()


def main():
    workers = {"export-worker": export_worker, "quantize-worker": quantize_worker,
               "latency-worker": latency_worker}
    if len(sys.argv) > 1 and sys.argv[1] in workers:
        return workers[sys.argv[1]](*sys.argv[2:])
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # The export runs in its own process too, so this one never holds the weights.
    exported = run_isolated("benchmarks.bench_quantize", "export-worker", str(args.work),
                            args.family, "1b" if args.one_b else "medium", str(args.seq_len))
    emit(exported)
    artifact = Path(exported["artifact"])
    calib = args.work / "calibration.txt"
    calib.write_text(CALIBRATION_TEXT)
    results = {"benchmark": "quantize", "artifact": str(artifact), "fp32_mb": size_mb(artifact)}
    runs = [("int8", "minmax", "-")]
    if not args.one_b:
        runs.append(("int8", "nbits", "4"))
    runs += [("int4", "nbits", level) for level in args.levels.split(",")]
    variants = [("fp32", artifact)]
    for precision, method, level in runs:
        name = f"{precision}-{method}" + (f"-level{level}" if level != "-" else "")
        out = args.work / f"{artifact.name}-{name}"
        record = run_isolated("benchmarks.bench_quantize", "quantize-worker", str(artifact),
                              str(out), precision, method, str(calib), "8", level)
        record["size_mb"] = size_mb(out)
        emit(record)
        results[name] = record
        variants.append((name, out))
    if not args.one_b:
        latency = run_isolated("benchmarks.bench_quantize", "latency-worker",
                               str(args.threads), str(args.rounds), str(args.repeats),
                               *(f"{name}={path}" for name, path in variants))
        emit(latency)
        results["latency"] = latency
    emit(results)


if __name__ == "__main__":
    main()
