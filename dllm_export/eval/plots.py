"""PNG plots of an eval report for people (matplotlib, imported only here, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from dllm_export.errors import DllmExportError


def plot_samplers(report: dict, path) -> Path:
    """Task accuracy against tokens/s, one point per model and decoding mode
    (``eval --samplers``), the baseline's autoregressive run as the reference lines."""
    rows = [r for r in report.get("samplers") or [] if "skipped" not in r]
    if not rows:
        raise DllmExportError("--plot: the report has no decoding modes to plot (add "
                              "--samplers)")
    try:
        import matplotlib
    except ImportError:
        raise DllmExportError("--plot needs matplotlib: pip install 'dllm-export[plots]'") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"model": Path(report["model"]["info"]["path"]).name}
    if report.get("other"):
        names["other"] = Path(report["other"]["info"]["path"]).name
    figure, axis = plt.subplots(figsize=(7, 4.5))
    markers = {"model": "o", "other": "s"}
    points: dict = {}  # modes that land on one point (e.g. an untrained draft) share a label
    for row in rows:
        speed, accuracy = row["speed"]["tokens_per_second"], row["tasks"]["mean"]
        key = (row["model"], round(speed, -1), round(accuracy, 3))
        points.setdefault(key, (speed, accuracy, []))[2].append(row["sampler"])
    for (model, _, _), (speed, accuracy, modes) in points.items():
        axis.scatter(speed, accuracy, marker=markers[model], s=60)
        axis.annotate(f"{names[model]}: {' = '.join(modes)}", (speed, accuracy),
                      textcoords="offset points", xytext=(6, 4), fontsize=8)
    axis.margins(x=0.3, y=0.12)
    base = next((r for r in rows if r.get("vs_base", {}).get("speedup") == 1.0
                 and r["sampler"] == "autoregressive"), None)
    if base is not None:
        axis.axvline(base["speed"]["tokens_per_second"], color="gray", linewidth=0.8,
                     linestyle="--")
        axis.axhline(base["tasks"]["mean"], color="gray", linewidth=0.8, linestyle="--")
    settings = report["settings"]
    axis.set(xlabel="answer tokens per second (batch 1)", ylabel="mean task accuracy",
             title=f"decoding modes: {settings['samples']} held-out problems per task "
                   f"({', '.join(settings['tasks'])})")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
