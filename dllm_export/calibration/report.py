"""The terminal summary of ``dllm-export quantize``: calibration coverage and the gate."""

from __future__ import annotations


def print_quantization(out_dir, manifest: dict, console) -> None:
    from rich.table import Table

    quant = manifest["quantization"]
    console.print(
        f"[bold]{quant['precision']}[/] {quant['method']} ({quant['backend']}, "
        f"{quant['format']}): {quant['quantized_nodes']} linear layers, "
        f"{len(quant['excluded'])} kept in high precision"
    )
    for graph, counts in (quant.get("kernels") or {}).items():
        ops = ", ".join(f"{op} {n}" for op, n in counts["ops"].items())
        console.print(
            f"ONNX Runtime CPU kernels ({graph} graph): {counts['integer']} integer, "
            f"{counts['weight_only']} weight-only, {counts['float']} float of "
            f"{counts['linear_layers']} linear layers ({ops})"
        )
    calibration = quant.get("calibration")
    if calibration and "kept" in calibration:  # DiffusionGemma's own denoising states
        console.print(
            f"calibration: {calibration['prompts']} generations from {calibration['source']}, "
            + ", ".join(f"{graph} {kept} of {calibration['seen'][graph]}"
                        for graph, kept in calibration["kept"].items())
            + " states kept")
    elif calibration:
        histogram = calibration["mask_ratio_histogram"]
        console.print(
            f"calibration: {calibration['states']} states from "
            f"{calibration['source']} ({calibration['mode']})"
        )
        for origin in ("forward", "trajectory"):
            if origin in histogram:
                bars = " ".join(str(c) for c in histogram[origin])
                console.print(f"  mask ratio 0.0..1.0 by 0.1, {origin}: {bars}")
        experts = calibration.get("experts")
        if experts:
            console.print(
                f"  experts: routed top-{experts['top_k']}, statistics at "
                f"top-{experts['calibration_top_k']}; no routed token: "
                f"{', '.join(experts['unrouted']) or 'none'}; no statistics: "
                f"{', '.join(experts['uncalibrated']) or 'none'}"
            )
    gate = manifest.get("quality_gate")
    if gate:
        table = Table(title=f"quality gate ({gate['evaluation']})")
        for column in ("check", "value", "bar", "passed"):
            table.add_column(column)
        for check in gate["checks"]:
            value = check["value"]
            shown = "-" if value is None else f"{value:.4f}"
            if check.get("judged") is False:
                shown += " (not judged)"
            table.add_row(
                check["name"],
                shown,
                str(check["bar"]),
                "yes" if check["passed"] else "[red]no[/]",
            )
        console.print(table)
        phases = gate.get("report", {}).get("by_phase")
        if phases:  # DiffusionGemma's lockstep run
            console.print("denoising steps, argmax / sample agreement: " + ", ".join(
                f"{phase} {v['argmax']:.3f} / {v['sample']:.3f}" for phase, v in phases.items()))
    console.print(f"runs on: {', '.join(quant['runs_on']) or 'no shipped profile'}")
    console.print(f"[bold green]{out_dir}[/] valid={manifest['valid']}")
