"""What one forward of each cached graph costs: the one-row decode graph (autoregressive
decoding), the draft-and-verify graph (2 x block rows: TiDAR's verify + draft, block
diffusion) and the prefill, on ONNX Runtime CPU, side by side in one process.

    python -m benchmarks.bench_tidar_forwards out/tidar-onnx --threads 1 --rounds 5

Each round times every graph in turn (the order rotating each round) on zero inputs of
its fixed shapes; the ratio of the draft graph to the decode graph is taken within a
round, and the summary gives its min / median. That ratio is the number of tokens a
draft-and-verify forward must commit to match autoregressive decoding's tokens/s.
Prints JSON lines, the summary last.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from benchmarks._common import emit, timed

GRAPHS = ("decode", "draft", "prefill")
DTYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(bool)": np.bool_}


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    run = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                              dtype=DTYPES[i.type]) for i in run.get_inputs()}
    rows = feeds["input_ids"].shape[1]
    return (lambda: run.run(None, feeds)), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    graphs = {name: session(args.artifact / f"{name}.onnx", args.threads)
              for name in GRAPHS if (args.artifact / f"{name}.onnx").is_file()}
    if not {"decode", "draft"} <= set(graphs):
        raise SystemExit(f"{args.artifact}: no decode and draft graphs (export a family "
                         "with draft-and-verify decoding, e.g. zaya1)")
    rounds = []
    for index in range(args.rounds):
        order = list(graphs)[index % len(graphs):] + list(graphs)[:index % len(graphs)]
        record = {"round": index + 1}
        for name in order:
            record[name] = timed(graphs[name][0], warmup=3, repeats=args.repeats)["median_ms"]
        rounds.append(record)
        emit(record)
    ratios = [r["draft"] / r["decode"] for r in rounds]
    emit({"summary": True, "artifact": str(args.artifact), "family": manifest.get("family"),
          "threads": args.threads,
          "rows": {name: rows for name, (_, rows) in graphs.items()},
          "median_ms": {name: round(statistics.median(r[name] for r in rounds), 3)
                        for name in graphs},
          "draft_over_decode": {"min": round(min(ratios), 2),
                                "median": round(statistics.median(ratios), 2)}})


if __name__ == "__main__":
    main()
