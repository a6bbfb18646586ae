"""ONNX Runtime CPU against PyTorch eager: per-step denoiser latency and generation speed.

    python -m benchmarks.bench_denoiser --model dllm_export/data/default-model --seq-lens 256 1024

Exports the model at each length (cached under --work), then runs each backend in its own
process, one after another, on the same inputs. Prints JSON lines and a summary with the
ratios (PyTorch time / ONNX Runtime time: above 1 means ONNX Runtime is faster).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._common import emit, run_isolated


def ensure_artifact(model: str, work: Path, seq_len: int, moe: str) -> Path:
    from dllm_export.export.onnx import ExportOptions, export_model

    out = work / f"{Path(model).name}-L{seq_len}-{moe}"
    if not (out / "manifest.json").is_file():
        export_model(model, out, ExportOptions(seq_len=seq_len, moe=moe, overwrite=True))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--moe", default="dense")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    summary = []
    for seq_len in args.seq_lens:
        artifact = ensure_artifact(args.model, args.work, seq_len, args.moe)
        ort = run_isolated("benchmarks.worker", "ort", str(artifact), "--threads", str(args.threads))
        emit(ort)
        torch = run_isolated("benchmarks.worker", "torch", args.model, "--seq-len", str(seq_len),
                             "--threads", str(args.threads))
        emit(torch)
        summary.append({
            "seq_len": seq_len,
            "step_ms": {"onnxruntime": ort["step"]["median_ms"], "torch": torch["step"]["median_ms"]},
            "step_speedup": round(torch["step"]["median_ms"] / ort["step"]["median_ms"], 2),
            "tokens_per_second": {"onnxruntime": ort["generation"]["tokens_per_second"],
                                  "torch": torch["generation"]["tokens_per_second"]},
            "generation_speedup": round(ort["generation"]["tokens_per_second"]
                                        / torch["generation"]["tokens_per_second"], 2),
        })
    emit({"benchmark": "denoiser", "model": args.model, "moe": args.moe, "results": summary})


if __name__ == "__main__":
    main()
