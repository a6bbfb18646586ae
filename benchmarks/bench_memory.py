"""Peak memory of loading and exporting a generated checkpoint of about 1B parameters.

    python -m benchmarks.bench_memory --work out/bench

Targets: loading holds one copy of the weights (peak RSS < 1.3x the weight bytes, net of
the interpreter and torch import); export stays under 2.5x the weight bytes of its dtype.
Each measurement runs in its own process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks._common import current_rss_bytes, emit, peak_rss_bytes, run_isolated

# LLaDA-MoE layout at ~0.97B parameters: 16 layers, hidden 1024, 16 experts of width 1024,
# top-2, vocabulary 50k.
ONE_B = {"hidden_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
         "num_key_value_heads": 16, "num_experts": 16, "num_experts_per_tok": 2,
         "expert_intermediate_size": 1024, "dense_intermediate_size": 4096,
         "moe_layer_freq": [1] * 16, "vocab_size": 50048}


def make_checkpoint(work: Path) -> Path:
    from dllm_export.models.tiny import make_tiny

    path = work / "llada-moe-1b"
    if not (path / "config.json").is_file():
        make_tiny("llada-moe", path, dtype="bfloat16", shards=4, overrides=ONE_B, overwrite=True)
    return path


def load_worker(path: str):
    import torch  # noqa: F401  (counted in the baseline, as any user pays it)

    from dllm_export.models import load_model

    baseline = current_rss_bytes()
    started = time.perf_counter()
    model, _ = load_model(path, dtype="auto")
    seconds = time.perf_counter() - started
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    after_load = peak_rss_bytes()
    # safetensors maps the shards and pages them in lazily: touch every weight (as a forward
    # pass would) before taking the peak, so the figure is the resident one.
    for param in model.parameters():
        param.sum()
    peak = peak_rss_bytes()
    emit({"stage": "load", "parameters": sum(p.numel() for p in model.parameters()),
          "weight_bytes": weight_bytes, "baseline_rss": baseline,
          "peak_rss_after_load": after_load, "peak_rss": peak,
          "net_ratio": round((peak - baseline) / weight_bytes, 3),
          "gross_ratio": round(peak / weight_bytes, 3), "seconds": round(seconds, 1)})


def export_worker(path: str, out: str, dtype: str, seq_len: int):
    import torch  # noqa: F401

    from dllm_export.export.onnx import ExportOptions, export_model

    baseline = current_rss_bytes()
    started = time.perf_counter()
    manifest = export_model(path, out, ExportOptions(seq_len=seq_len, dtype=dtype, overwrite=True))
    seconds = time.perf_counter() - started
    from dllm_export.inspect import inspect_checkpoint

    parameters = inspect_checkpoint(path)["parameters"]
    weight_bytes = parameters * {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    peak = peak_rss_bytes()
    emit({"stage": "export", "dtype": dtype, "seq_len": seq_len, "parameters": parameters,
          "weight_bytes": weight_bytes, "baseline_rss": baseline, "peak_rss": peak,
          "net_ratio": round((peak - baseline) / weight_bytes, 3),
          "gross_ratio": round(peak / weight_bytes, 3), "seconds": round(seconds, 1),
          "valid": manifest["valid"],
          "top1_min": min(r["top1_agreement"] for r in manifest["validation"]["results"])})


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "load-worker":
        return load_worker(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "export-worker":
        return export_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("out/bench"))
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--skip-export", action="store_true")
    args = parser.parse_args()
    checkpoint = make_checkpoint(args.work)
    load = run_isolated("benchmarks.bench_memory", "load-worker", str(checkpoint))
    emit(load)
    results = {"benchmark": "memory", "load": load}
    if not args.skip_export:
        export = run_isolated("benchmarks.bench_memory", "export-worker", str(checkpoint),
                              str(args.work / "llada-moe-1b-onnx"), args.dtype, str(args.seq_len))
        emit(export)
        results["export"] = export
    emit(results)


if __name__ == "__main__":
    main()
