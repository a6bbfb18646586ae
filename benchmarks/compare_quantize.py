"""The comparison behind docs/quantization.md: calibration data, calibration method and
per-precision methods on one float artifact, each judged by the quality gate's figures.

    python -m benchmarks.compare_quantize ARTIFACT --work out/compare [--gate-samples 16]

Every run writes its artifact with all bars disabled (so the figures of broken runs are
kept too) and prints one JSON line; the last line is a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks._common import emit

RUNS = [  # (label, QuantizeOptions fields)
    ("int8 minmax, mixed", dict(precision="int8", method="minmax")),
    (
        "int8 minmax, forward only",
        dict(precision="int8", method="minmax", calib_mode="forward"),
    ),
    (
        "int8 minmax, trajectory only",
        dict(precision="int8", method="minmax", calib_mode="trajectory"),
    ),
    ("int8 entropy, mixed", dict(precision="int8", method="entropy")),
    ("int8 percentile, mixed", dict(precision="int8", method="percentile")),
    ("int8 modelopt-max", dict(precision="int8", method="modelopt-max")),
    ("int8 modelopt-entropy", dict(precision="int8", method="modelopt-entropy")),
    ("int8 nbits (weight-only)", dict(precision="int8", method="nbits")),
    ("int4 nbits (weight-only)", dict(precision="int4", method="nbits")),
    ("int4 modelopt awq_clip", dict(precision="int4", method="awq_clip")),
    ("int4 modelopt rtn_dq", dict(precision="int4", method="rtn_dq")),
    (
        "fp8 modelopt-max (fake-quant eval)",
        dict(precision="fp8", method="modelopt-max"),
    ),
    (
        "BROKEN int8 minmax, 1 sample",
        dict(precision="int8", method="minmax", samples=1),
    ),
    (
        "BROKEN int8 minmax + router",
        dict(precision="int8", method="minmax", quantize_router=True),
    ),
    (
        "BROKEN int4 nbits + router",
        dict(precision="int4", method="nbits", quantize_router=True),
    ),
]
OFF = {
    "min_agreement": 0.0,
    "max_elbo_increase": 1e9,
    "max_task_drop": 1.0,
    "min_generation_agreement": 0.0,
}


def one_run(artifact: Path, out: Path, fields: dict, gate_samples: int) -> dict:
    from dllm_export.calibration.quantize import QuantizeOptions, quantize_artifact
    from dllm_export.errors import DllmExportError

    started = time.perf_counter()
    options = QuantizeOptions(
        **fields, bars=OFF, gate_samples=gate_samples, overwrite=True
    )
    try:
        manifest = quantize_artifact(artifact, out, options)
    except DllmExportError as err:
        return {"error": str(err)}
    checks = {c["name"]: c for c in manifest["quality_gate"]["checks"]}
    agreement = manifest["quality_gate"]["report"]["agreement"]
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    return {
        "agreement_by_ratio": agreement["masked"],
        "worst_agreement": checks["masked top-1 agreement (worst ratio)"]["value"],
        "elbo_float": checks["ELBO bits/token increase"]["float"],
        "elbo_quant": checks["ELBO bits/token increase"]["quantized"],
        "elbo_increase": checks["ELBO bits/token increase"]["value"],
        "generation_agreement": checks["generation token agreement"]["value"],
        "task_float": checks["task accuracy drop"]["float"],
        "task_quant": checks["task accuracy drop"]["quantized"],
        "size_mb": round(size / 1e6, 2),
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| run | masked top-1 agreement (worst ratio) | ELBO bits/token (float → quant) "
        "| generation agreement | task accuracy (float → quant) | MB | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | error: {row['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {row['label']} | {row['worst_agreement']:.3f} | {row['elbo_float']:.3f} → "
            f"{row['elbo_quant']:.3f} ({100 * row['elbo_increase']:+.1f} %) | "
            f"{row['generation_agreement']:.3f} | {row['task_float']:.3f} → "
            f"{row['task_quant']:.3f} | {row['size_mb']} | {row['seconds']} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--work", type=Path, default=Path("out/compare"))
    parser.add_argument("--gate-samples", type=int, default=16)
    parser.add_argument(
        "--only", default=None, help="comma-separated substrings of labels"
    )
    args = parser.parse_args()
    rows = []
    for index, (label, fields) in enumerate(RUNS):
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        row = {
            "label": label,
            **one_run(
                args.artifact, args.work / f"run{index}", fields, args.gate_samples
            ),
        }
        emit(row)
        rows.append(row)
    print(table(rows))
    print(json.dumps({"benchmark": "compare_quantize", "rows": rows}))


if __name__ == "__main__":
    main()
