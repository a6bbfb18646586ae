"""MoE routing strategies in the exported graph, on ONNX Runtime CPU.

    python -m benchmarks.bench_moe_strategies --model DIR --seq-lens 256 1024
    python -m benchmarks.bench_moe_strategies --llada2-experts 64 --seq-lens 32 256 --threads 1

``--llada2-experts E`` writes (once, under --work) a random LLaDA2 checkpoint with E experts
(top-8, 8 groups, 4 layers of width 256), the router and expert layout of LLaDA2.0 at a size
this machine runs.

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
LLADA2 = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 64, "rotary_dim": 32, "num_experts_per_tok": 8,
          "n_group": 8, "topk_group": 4, "moe_intermediate_size": 128,
          "intermediate_size": 1024}


def llada2_checkpoint(work: Path, experts: int) -> Path:
    from dllm_export.models.tiny import make_tiny

    out = work / f"llada2-e{experts}"
    if not (out / "config.json").is_file():
        make_tiny("llada2", out, overrides={**LLADA2, "num_experts": experts}, overwrite=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model")
    source.add_argument("--llada2-experts", type=int)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    if args.llada2_experts:
        args.model = str(llada2_checkpoint(args.work, args.llada2_experts))
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
