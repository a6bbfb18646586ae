"""MoE routing strategies in the exported graph, on ONNX Runtime CPU.

    python -m benchmarks.bench_moe_strategies --model DIR --seq-lens 256 1024

Each strategy is exported (and validated against PyTorch) at each length, then timed in its
own process. Prints JSON lines and a summary table with the top-1 agreement of each export.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._common import emit, run_isolated
from benchmarks.bench_denoiser import ensure_artifact

STRATEGIES = ("dense", "sparse", "ort")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    rows = []
    for seq_len in args.seq_lens:
        for strategy in args.strategies:
            artifact = ensure_artifact(args.model, args.work, seq_len, strategy)
            manifest = json.loads((artifact / "manifest.json").read_text())
            record = run_isolated("benchmarks.worker", "ort", str(artifact), "--threads",
                                  str(args.threads), "--repeats", str(args.repeats),
                                  "--no-generate")
            row = {"seq_len": seq_len, "strategy": strategy,
                   "step_median_ms": record["step"]["median_ms"],
                   "step_p10_p90_ms": [record["step"]["p10_ms"], record["step"]["p90_ms"]],
                   "top1_agreement_min": min(r["top1_agreement"]
                                             for r in manifest["validation"]["results"]),
                   "tensorrt_clean": manifest["trt_compatibility"]["clean"],
                   "onnx_mb": round((artifact / "model.onnx.data").stat().st_size / 2**20, 2)}
            emit(row)
            rows.append(row)
    emit({"benchmark": "moe_strategies", "model": args.model, "threads": args.threads,
          "results": rows})


if __name__ == "__main__":
    main()
