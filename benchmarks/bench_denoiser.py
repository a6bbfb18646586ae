"""ONNX Runtime CPU against PyTorch eager, and fused against unfused attention: one
denoiser step, side by side in one process.

    python -m benchmarks.bench_denoiser --model TINY_LLADA --seq-lens 256 1024 --threads 1

Exports the checkpoint at each length three times (cached under --work): attention fused
(``--attention auto``: ``com.microsoft::MultiHeadAttention`` on ONNX Runtime), as the
standard ``Attention`` op (``--attention onnx --opset 23``) and decomposed (MatMul / Add /
Softmax / MatMul, the export before fused attention). Then, in
rounds, times each backend on the same canvas (prompt then a masked response half) in
turn, the order rotating each round: PyTorch eager, ONNX Runtime fused and unfused, and the
standard-op graph, the fused graph on a left-padded canvas (its masked path; unpadded canvases take the unmasked
one). Each round's ratios are taken between timings of that round; the summary gives their
min / median. Prints JSON lines, the summary last.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from benchmarks._common import emit, timed

FORMS = ("auto", "decomposed")


def ensure_artifact(model: str, work: Path, seq_len: int, moe: str = "auto",
                    attention: str = "auto", opset: int = 18) -> Path:
    from dllm_export.export.onnx import ExportOptions, export_model

    out = work / f"{Path(model).name}-L{seq_len}-{moe}-{attention}-opset{opset}"
    if not (out / "manifest.json").is_file():
        export_model(model, out, ExportOptions(seq_len=seq_len, moe=moe, attention=attention,
                                               opset=opset, overwrite=True))
    return out


def canvases(seq_len: int, mask_id: int, seed: int = 0):
    """(unpadded, left-padded) ``(input_ids, attention_mask)`` pairs at batch 1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 200, size=(1, seq_len))
    ids[:, seq_len // 2:] = mask_id
    real = np.ones_like(ids)
    padded, padded_real = ids.copy(), real.copy()
    padded_real[:, : seq_len // 8] = 0
    return (ids, real), (padded, padded_real)


def ratio_summary(rounds: list[dict], numerator: str, denominator: str) -> dict:
    ratios = [r[numerator] / r[denominator] for r in rounds]
    return {"min": round(min(ratios), 3), "median": round(statistics.median(ratios), 3)}


def measure(model: str, work: Path, seq_len: int, threads: int, rounds: int,
            repeats: int) -> dict:
    import torch

    from dllm_export.runtime import Generator

    torch.set_num_threads(threads)
    fused_dir = ensure_artifact(model, work, seq_len)
    fused = Generator.from_artifact(fused_dir, threads=threads)
    unfused = Generator.from_artifact(ensure_artifact(model, work, seq_len,
                                                      attention="decomposed"), threads=threads)
    standard = Generator.from_artifact(ensure_artifact(model, work, seq_len, attention="onnx",
                                                       opset=23), threads=threads)
    eager = Generator.from_checkpoint(model)
    (ids, real), (padded, padded_real) = canvases(seq_len, fused.special.mask_id)
    runs = {
        "torch": lambda: eager.backend.predict(ids, real),
        "ort_fused": lambda: fused.backend.predict(ids, real),
        "ort_unfused": lambda: unfused.backend.predict(ids, real),
        "ort_onnx_attention": lambda: standard.backend.predict(ids, real),
        "ort_fused_padded": lambda: fused.backend.predict(padded, padded_real),
        "ort_unfused_padded": lambda: unfused.backend.predict(padded, padded_real),
    }
    same = {name: int((run().topk_ids[..., 0] == runs["torch"]().topk_ids[..., 0]).sum())
            for name, run in runs.items() if not name.endswith("padded")}
    names = list(runs)
    timings = []
    for index in range(rounds):
        order = names[index % len(names):] + names[: index % len(names)]
        timings.append({name: timed(runs[name], warmup=1, repeats=repeats)["median_ms"]
                        for name in order})
        emit({"seq_len": seq_len, "round": index, "step_ms": timings[-1]})
    return {
        "seq_len": seq_len,
        "step_ms_median": {name: round(statistics.median(t[name] for t in timings), 3)
                           for name in names},
        "ort_fused_vs_torch": ratio_summary(timings, "torch", "ort_fused"),
        "ort_unfused_vs_torch": ratio_summary(timings, "torch", "ort_unfused"),
        "fused_vs_unfused": ratio_summary(timings, "ort_unfused", "ort_fused"),
        "onnx_attention_vs_unfused": ratio_summary(timings, "ort_unfused",
                                                   "ort_onnx_attention"),
        "fused_vs_unfused_padded": ratio_summary(timings, "ort_unfused_padded",
                                                 "ort_fused_padded"),
        "padded_vs_unpadded_fused": ratio_summary(timings, "ort_fused_padded", "ort_fused"),
        "top1_equal_to_torch": same,
        "positions": int(ids.size),
        "attention_form": json.loads((fused_dir / "manifest.json").read_text())["attention"],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="steps per timing (median)")
    parser.add_argument("--work", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    results = [measure(args.model, args.work, seq_len, args.threads, args.rounds, args.repeats)
               for seq_len in args.seq_lens]
    emit({"benchmark": "denoiser", "model": args.model, "threads": args.threads,
          "rounds": args.rounds, "repeats": args.repeats, "results": results})


if __name__ == "__main__":
    main()
