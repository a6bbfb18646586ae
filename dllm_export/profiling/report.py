"""Writing a profile out: ``profile.json`` and ``profile.csv`` for machines, ``README.md`` and
PNG plots for people; and ``compare`` to put several profiles side by side.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from dllm_export.errors import DllmExportError
from dllm_export.jsonio import read_json, write_json

CSV_COLUMNS = (
    "label",
    "series",
    "value",
    "backend",
    "precision",
    "canvas_length",
    "gen_length",
    "steps",
    "block_length",
    "threshold",
    "step_median_ms",
    "step_p90_ms",
    "step_p99_ms",
    "forward_median_ms",
    "floor_ms",
    "bound",
    "measured_over_floor",
    "achieved_gb_per_s",
    "achieved_tflop_per_s",
    "tokens_per_second",
    "answer_tokens_per_second",
    "tokens_per_forward",
    "forwards_per_generation",
    "first_block_ms",
    "peak_rss_mb",
    "accuracy",
    "predicted_tokens_per_second",
)


def csv_rows(profile: dict) -> list[dict]:
    """One row per measured point, then one for the autoregressive baseline."""
    backend = profile["target"]["backend"]
    rows = []
    for point in profile["points"]:
        m, floor, s = point["measured"], point.get("roofline", {}), point["settings"]
        rows.append(
            {
                "label": point["label"],
                "series": point["series"],
                "value": point["value"],
                "backend": backend,
                "precision": point["precision"],
                "canvas_length": m["canvas_length"],
                "gen_length": s.get("gen_length"),
                "steps": s.get("steps"),
                "block_length": s.get("block_length"),
                "threshold": s.get("threshold"),
                "step_median_ms": m["step"].get("median_ms"),
                "step_p90_ms": m["step"].get("p90_ms"),
                "step_p99_ms": m["step"].get("p99_ms"),
                "forward_median_ms": m["forward"].get("median_ms"),
                **{
                    k: floor.get(k)
                    for k in (
                        "floor_ms",
                        "bound",
                        "measured_over_floor",
                        "achieved_gb_per_s",
                        "achieved_tflop_per_s",
                        "predicted_tokens_per_second",
                    )
                },
                "tokens_per_second": m["tokens_per_second"].get("median"),
                "answer_tokens_per_second": m["answer_tokens_per_second"].get("median"),
                "tokens_per_forward": m["tokens_per_forward"],
                "forwards_per_generation": m["forwards_per_generation"].get("median"),
                "first_block_ms": m["first_block_ms"].get("median"),
                "peak_rss_mb": m.get("peak_rss_bytes", 0) / 2**20,
                "accuracy": (point.get("quality") or {}).get("accuracy"),
            }
        )
    ar = profile["autoregressive"]
    if ar.get("measured"):
        m, floor = ar["measured"], ar.get("roofline", {})
        rows.append(
            {
                "label": "autoregressive",
                "series": "autoregressive",
                "backend": backend,
                "precision": floor.get("precision"),
                "gen_length": m["new_tokens"],
                "step_median_ms": m["token"].get("median_ms"),
                "step_p90_ms": m["token"].get("p90_ms"),
                "step_p99_ms": m["token"].get("p99_ms"),
                "forward_median_ms": m["token"].get("median_ms"),
                **{
                    k: floor.get(k)
                    for k in (
                        "floor_ms",
                        "bound",
                        "measured_over_floor",
                        "achieved_gb_per_s",
                        "achieved_tflop_per_s",
                        "predicted_tokens_per_second",
                    )
                },
                "tokens_per_second": m["tokens_per_second"].get("median"),
                "tokens_per_forward": 1.0,
                "forwards_per_generation": m["new_tokens"],
                "peak_rss_mb": m.get("peak_rss_bytes", 0) / 2**20,
            }
        )
    return rows


def _write_csv(path: Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})


def _cell(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def write_report(profile: dict, out_dir, command: str | None = None) -> dict:
    """Write the JSON, CSV, markdown and plots of ``profile`` into ``out_dir``, as a whole
    directory (a previous report of ours is replaced; any other directory is refused).

    Returns {"json": path, "csv": path, "markdown": path, "plots": [paths]}.
    """
    from dllm_export.jsonio import atomic_directory
    from dllm_export.profiling.markdown import render_profile
    from dllm_export.profiling.plots import draw_all

    out_dir = Path(out_dir)
    if command:
        profile = {**profile, "command": command}
    target = (profile.get("target") or {}).get("path")
    with atomic_directory(out_dir, overwrite=True, inputs=(target,) if target else ()) as tmp:
        write_json(tmp / "profile.json", profile)
        _write_csv(tmp / "profile.csv", csv_rows(profile), CSV_COLUMNS)
        plots = draw_all(profile, tmp)
        (tmp / "README.md").write_text(
            render_profile(profile, [p.name for p in plots]), encoding="utf-8"
        )
    markdown = out_dir / "README.md"
    plots = [out_dir / p.name for p in plots]
    return {
        "json": out_dir / "profile.json",
        "csv": out_dir / "profile.csv",
        "markdown": markdown,
        "plots": plots,
    }


def load_profile_report(path) -> dict:
    """A report directory (or its profile.json), checked to be a profile."""
    path = Path(path)
    file = path / "profile.json" if path.is_dir() else path
    data = read_json(file, "a profile report")
    if data.get("format") != "dllm-export-profile":
        raise DllmExportError(f"{file}: not a dllm-export profile report")
    return data


def report_label(profile: dict) -> str:
    target = profile["target"]
    return (
        f"{Path(target.get('requested') or target['path']).name} {target['backend']} {target['precision']} "
        f"({profile['device_profile']['name']})"
    )


COMPARE_COLUMNS = (
    "label",
    "created",
    "step_ms_median",
    "step_floor_ms",
    "measured_over_floor",
    "bound",
    "diffusion_tokens_per_second",
    "autoregressive_tokens_per_second",
    "diffusion_over_autoregressive",
    "tokens_per_forward",
    "forwards_per_generation",
    "accuracy",
    "machine_load",
)


def compare_reports(
    report_dirs: list, out_dir, preface: list[str] | None = None
) -> dict:
    """Put several profiles side by side: compare.json, compare.csv, README.md, a plot.

    ``preface``: markdown lines placed under the page title (what was run, and why).
    """
    from dllm_export.profiling.markdown import render_compare
    from dllm_export.profiling.plots import compare_tokens

    if len(report_dirs) < 2:
        raise DllmExportError("--compare needs at least two report directories")
    reports = [load_profile_report(d) for d in report_dirs]
    labels = [report_label(r) for r in reports]
    rows = [
        {
            "label": label,
            "created": r["created"],
            **r["headline"],
            "machine_load": r["machine"]["load_before"].get("load_average_1min"),
            # relative, so that the page's links work wherever the folder is copied
            "source": os.path.relpath(Path(d).resolve(), Path(out_dir).resolve()),
        }
        for label, r, d in zip(labels, reports, report_dirs, strict=True)
    ]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / "compare.json",
        {"format": "dllm-export-profile-compare", "reports": rows},
    )
    _write_csv(out_dir / "compare.csv", rows, COMPARE_COLUMNS)
    plot = compare_tokens(reports, labels, out_dir / "compare_tokens.png")
    markdown = out_dir / "README.md"
    markdown.write_text(render_compare(rows, plot.name, preface), encoding="utf-8")
    return {
        "json": out_dir / "compare.json",
        "csv": out_dir / "compare.csv",
        "markdown": markdown,
        "plots": [plot],
    }
