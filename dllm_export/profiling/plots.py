"""PNG plots of a profile for people (matplotlib, imported only here, Agg backend).

Each function takes the profile dict and a path, draws one figure and returns the path, or
None when the profile has nothing to draw for it (no such sweep).
"""

from __future__ import annotations

from pathlib import Path

SIZE, DPI = (6.4, 4.0), 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(profile: dict, key: str) -> list[dict]:
    points = [p for p in profile["points"] if p["series"] == key]
    if all(isinstance(p["value"], (int, float)) for p in points):
        return sorted(points, key=lambda p: p["value"])
    return points  # categories (cache modes) in the order they were swept


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def latency_vs_seq_len(profile: dict, path: Path) -> Path | None:
    """Measured forward latency (median, p90 bar) and the roofline floor per canvas length."""
    points = _series(profile, "seq_len")
    if not points:
        return None
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=SIZE)
    lengths = [p["measured"]["canvas_length"] for p in points]
    median = [p["measured"]["forward"]["median_ms"] for p in points]
    p90 = [
        p["measured"]["forward"]["p90_ms"] - m
        for p, m in zip(points, median, strict=True)
    ]
    axis.errorbar(
        lengths,
        median,
        yerr=[[0] * len(p90), p90],
        marker="o",
        capsize=3,
        label="measured forward (median, bar to p90)",
    )
    floors = [p["roofline"].get("floor_ms") for p in points]
    if all(floors):
        axis.plot(lengths, floors, "k--", marker=".", label="roofline floor")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("canvas length (tokens)")
    axis.set_ylabel("ms per denoiser forward")
    axis.set_title(
        f"{profile['target']['backend']} on {profile['device_profile']['name']}: "
        "latency vs sequence length"
    )
    axis.legend(fontsize=8)
    axis.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def speed_vs_setting(profile: dict, key: str, path: Path) -> Path | None:
    """Tokens/s (and TPF) against a sampler setting, with task accuracy beside it."""
    points = _series(profile, key)
    if not points:
        return None
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=SIZE)
    values = [p["value"] for p in points]
    rates = [p["measured"]["tokens_per_second"]["median"] for p in points]
    if not all(isinstance(v, (int, float)) for v in values):  # categories: bars
        values = [str(v) for v in values]
        axis.bar(values, rates, color="tab:blue", alpha=0.8, label="tokens/s (median)")
        baseline = profile["headline"].get("autoregressive_tokens_per_second")
        if baseline:
            axis.axhline(baseline, color="k", linestyle="--",
                         label=f"autoregressive, same graphs ({baseline:,.0f}/s)")
            axis.legend(fontsize=8, loc="lower right")
    else:
        axis.plot(values, rates, "o-", color="tab:blue", label="tokens/s (median)")
    for value, rate, p in zip(values, rates, points, strict=True):
        axis.annotate(
            f"TPF {p['measured']['tokens_per_forward']:.1f}",
            (value, rate),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=7,
        )
    axis.set_xlabel(key)
    axis.set_ylabel("tokens per second (median)", color="tab:blue")
    accuracy = [(p.get("quality") or {}).get("accuracy") for p in points]
    if any(a is not None for a in accuracy):
        twin = axis.twinx()
        twin.plot(
            values,
            [a if a is not None else float("nan") for a in accuracy],
            "s--",
            color="tab:red",
            label="task accuracy",
        )
        twin.set_ylabel("exact-match accuracy", color="tab:red")
        twin.set_ylim(0, 1)
    axis.set_title(
        f"speed vs {key} ({profile['target']['backend']}, "
        f"{profile['device_profile']['name']})"
    )
    axis.grid(True, alpha=0.3)
    return _save(fig, path)


def diffusion_vs_autoregressive(profile: dict, path: Path) -> Path | None:
    """Measured and roofline-predicted tokens/s of diffusion and of the AR baseline."""
    plt = _pyplot()
    head = profile["headline"]
    base = profile["points"][0]
    ar = profile["autoregressive"]
    bars = [
        ("diffusion\nmeasured", head.get("diffusion_tokens_per_second"), "tab:blue"),
        (
            "diffusion\nanswer tokens",
            head.get("diffusion_answer_tokens_per_second"),
            "tab:cyan",
        ),
        (
            "autoregressive\nmeasured",
            head.get("autoregressive_tokens_per_second"),
            "tab:orange",
        ),
        (
            "diffusion\nroofline",
            base["roofline"].get("predicted_tokens_per_second"),
            "lightsteelblue",
        ),
        (
            "autoregressive\nroofline",
            ar.get("roofline", {}).get("predicted_tokens_per_second"),
            "navajowhite",
        ),
    ]
    bars = [b for b in bars if b[1]]
    fig, axis = plt.subplots(figsize=SIZE)
    axis.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    for index, (_, value, _) in enumerate(bars):
        axis.text(index, value, f"{value:,.0f}", ha="center", va="bottom", fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel("tokens per second (log)")
    axis.set_title(
        f"diffusion (TPF {head['tokens_per_forward']:.2f}) vs autoregressive, "
        f"{profile['device_profile']['name']}"
    )
    axis.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def measured_vs_roofline(profile: dict, path: Path) -> Path | None:
    """Per point: measured forward time beside its floor (and the AR token), log scale."""
    plt = _pyplot()
    rows = [
        (
            p["label"],
            p["measured"]["forward"].get("median_ms"),
            p["roofline"].get("floor_ms"),
        )
        for p in profile["points"]
    ]
    ar = profile["autoregressive"]
    if ar.get("measured"):
        rows.append(
            (
                "AR token",
                ar["measured"]["token"].get("median_ms"),
                ar["roofline"].get("floor_ms"),
            )
        )
    rows = [r for r in rows if r[1] and r[2]]
    if not rows:
        return None
    fig, axis = plt.subplots(figsize=(max(6.4, 0.9 * len(rows) + 2), 4.0))
    positions = range(len(rows))
    axis.bar([i - 0.2 for i in positions], [r[1] for r in rows], 0.4, label="measured")
    axis.bar(
        [i + 0.2 for i in positions],
        [r[2] for r in rows],
        0.4,
        label="roofline floor",
        color="gray",
    )
    for index, (_, measured, floor) in enumerate(rows):
        axis.text(
            index,
            measured,
            f"{measured / floor:.0f}x",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    axis.set_xticks(
        list(positions), [r[0] for r in rows], rotation=30, ha="right", fontsize=8
    )
    axis.set_yscale("log")
    axis.set_ylabel("ms per forward (log)")
    axis.set_title(f"measured vs roofline floor on {profile['device_profile']['name']}")
    axis.legend(fontsize=8)
    return _save(fig, path)


def compare_tokens(reports: list[dict], labels: list[str], path: Path) -> Path:
    """Side by side: diffusion and autoregressive tokens/s of several profiles."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(max(6.4, 1.4 * len(reports) + 2), 4.0))
    positions = range(len(reports))
    diffusion = [r["headline"].get("diffusion_tokens_per_second") or 0 for r in reports]
    autoregressive = [
        r["headline"].get("autoregressive_tokens_per_second") or 0 for r in reports
    ]
    axis.bar([i - 0.2 for i in positions], diffusion, 0.4, label="diffusion")
    axis.bar([i + 0.2 for i in positions], autoregressive, 0.4, label="autoregressive")
    axis.set_xticks(list(positions), labels, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("tokens per second (median)")
    axis.set_title("profiles side by side")
    axis.legend(fontsize=8)
    axis.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def draw_all(profile: dict, out_dir: Path) -> list[Path]:
    """Every plot that applies to ``profile``, written into ``out_dir``."""
    out_dir = Path(out_dir)
    made = [
        latency_vs_seq_len(profile, out_dir / "latency_vs_seq_len.png"),
        diffusion_vs_autoregressive(
            profile, out_dir / "diffusion_vs_autoregressive.png"
        ),
        measured_vs_roofline(profile, out_dir / "measured_vs_roofline.png"),
    ]
    keys = {p["series"] for p in profile["points"]} - {"baseline", "seq_len"}
    for key in sorted(keys):
        made.append(speed_vs_setting(profile, key, out_dir / f"tokens_vs_{key}.png"))
    return [path for path in made if path is not None]
