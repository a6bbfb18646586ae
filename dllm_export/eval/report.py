"""The terminal view of an ``evaluate`` report: one short table, deltas when comparing."""

from __future__ import annotations


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def report_rows(report: dict) -> list[tuple]:
    """(metric, model, other, delta, agreement) rows; the last three empty without other."""
    first, second = report["model"], report.get("other")
    deltas, agreement = report.get("deltas", {}), report.get("agreement", {})
    rows = []
    for key, masked in first["masked"].items():
        rows.append((f"masked acc @{key}", masked["accuracy"],
                     second and second["masked"][key]["accuracy"],
                     deltas.get("masked_accuracy", {}).get(key),
                     agreement.get("masked", {}).get(key)))
    rows.append(("ELBO bits/token", first["elbo"].get("bits_per_token"),
                 second and second["elbo"].get("bits_per_token"),
                 deltas.get("elbo_bits_per_token"), None))
    for task, score in first["tasks"].items():
        value = score if task == "mean" else score["accuracy"]
        other = second and (second["tasks"][task] if task == "mean"
                            else second["tasks"][task]["accuracy"])
        rows.append((f"task {task}", value, other,
                     deltas.get("task_accuracy", {}).get(task), None))
    generation = agreement.get("generation")
    if generation:
        rows.append(("identical outputs", None, None, None, generation["identical_share"]))
        rows.append(("output tokens", None, None, None, generation["token_agreement"]))
    for key, label in (("tokens_per_forward", "tokens/forward"),
                       ("tokens_per_second", "tokens/s")):
        rows.append((label, first["speed"][key], second and second["speed"][key],
                     deltas.get(key), None))
    return rows


def print_report(report: dict, console) -> None:
    """A rich table on ``console``: metric, model, [other, delta, agreement]."""
    from rich.table import Table

    comparing = "other" in report
    settings = report["settings"]
    sampler = settings["sampler"]
    console.print(f"[bold]model[/] {_label(report['model']['info'])}")
    if comparing:
        console.print(f"[bold]other[/] {_label(report['other']['info'])}")
    console.print(
        f"{','.join(settings['tasks'])} x {settings['samples']} held-out problems; "
        f"mc_num {settings['mc_num']}; {sampler['algorithm']} gen {sampler['gen_length']} "
        f"steps {sampler['steps']}; canvas {settings['seq_len'] or 'per batch'}, "
        f"batch {settings['batch']}", style="dim")
    table = Table()
    table.add_column("metric")
    table.add_column("model", justify="right")
    if comparing:
        for column in ("other", "delta", "agreement"):
            table.add_column(column, justify="right")
    for metric, value, other, delta, agree in report_rows(report):
        digits = 2 if metric == "tokens/s" else 4
        cells = [metric, _fmt(value, digits)]
        if comparing:
            cells += [_fmt(other, digits), _signed(delta, digits), _fmt(agree)]
        table.add_row(*cells)
    console.print(table)
    print_cache_modes(report, console)
    print_samplers(report, console)


def print_cache_modes(report: dict, console) -> None:
    """Accuracy against speed per cache mode and threshold (``--cache-modes``)."""
    rows = report.get("cache_modes")
    if not rows:
        return
    from rich.table import Table

    reference = next(k for k in rows[0] if k.startswith("agreement_with_"))
    table = Table(title="cache modes (model)")
    for column in ("cache", "threshold", "task mean", "tokens/forward", "tokens/s",
                   reference.replace("_", " ")):
        table.add_column(column, justify="left" if column == "cache" else "right")
    for row in rows:
        table.add_row(row["cache"], _fmt(row["threshold"], 2), _fmt(row["tasks"]["mean"]),
                      _fmt(row["speed"]["tokens_per_forward"], 2),
                      _fmt(row["speed"]["tokens_per_second"], 1),
                      _fmt(row[reference]["token_agreement"]))
    console.print(table)


def print_samplers(report: dict, console) -> None:
    """Accuracy against speed per model and decoding mode (``--samplers``)."""
    rows = report.get("samplers")
    if not rows:
        return
    from rich.table import Table

    base = next((r["vs_base"]["baseline"] for r in rows if "vs_base" in r), None)
    title = ("decoding modes (batch 1, interleaved; agreement: tokens equal to each "
             f"model's {rows[0].get('sampler')} run")
    table = Table(title=title + (f"; points and speed: against the {base} run)" if base
                                 else ")"))
    columns = ["model", "mode", "accuracy", "tokens/fwd", "tokens/s", "agreement"]
    if base:
        columns[3:3] = ["points"]
        columns[-1:-1] = ["speed"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "mode") else "right")
    for row in rows:
        if "skipped" in row:
            table.add_row(row["model"], row["sampler"], "skipped",
                          *[""] * (len(columns) - 3))
            continue
        cells = [row["model"], row["sampler"], _fmt(row["tasks"]["mean"]),
                 _fmt(row["speed"]["tokens_per_forward"], 2),
                 _fmt(row["speed"]["tokens_per_second"], 1),
                 _fmt(row["agreement"]["token_agreement"])]
        if base:
            versus = row["vs_base"]
            cells[3:3] = [f"{versus['accuracy_points']:+.1f}"]
            cells[-1:-1] = [f"{versus['speedup']:.2f}x" if versus["speedup"] else "-"]
        table.add_row(*cells)
    console.print(table)


def _label(info: dict) -> str:
    return (f"{info['path']} ({info['kind']}, {info['backend']}, "
            f"{info.get('precision') or '?'})")
