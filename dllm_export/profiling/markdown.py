"""The markdown pages of a profile report and of a comparison."""

from __future__ import annotations

from pathlib import Path


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(_num(c) if not isinstance(c, str) else c for c in row) + " |"
        for row in rows
    ]
    return lines + [""]


def _headline(p: dict) -> list[str]:
    h, ar = p["headline"], p["autoregressive"]
    rows = [
        ["denoiser forward, median (ms)", h["step_ms_median"]],
        ["whole step incl. sampler, median (ms)", h["step_with_sampler_ms_median"]],
        ["roofline floor of one forward (ms)", h["step_floor_ms"]],
        ["measured / floor", h["measured_over_floor"]],
        ["bound by", h["bound"] or "–"],
        ["achieved GB/s", h["achieved_gb_per_s"]],
        ["achieved TFLOP/s", h["achieved_tflop_per_s"]],
        ["tokens per forward (TPF)", h["tokens_per_forward"]],
        ["forwards per generation (NFE)", h["forwards_per_generation"]],
        ["time to first committed block (ms)", h["first_block_ms"]],
        [
            "diffusion tokens/s (gen_length positions per generation)",
            h["diffusion_tokens_per_second"],
        ],
        [
            "diffusion tokens/s (answer tokens, up to EOS)",
            h["diffusion_answer_tokens_per_second"],
        ],
        [
            "autoregressive tokens/s",
            h.get("autoregressive_tokens_per_second") or ar.get("how", "–"),
        ],
        [
            "diffusion / autoregressive (measured, positions)",
            h.get("diffusion_over_autoregressive"),
        ],
        [
            "diffusion / autoregressive (measured, answer tokens)",
            h.get("diffusion_answer_over_autoregressive"),
        ],
        [
            "diffusion / autoregressive (roofline)",
            h.get("roofline_diffusion_over_autoregressive"),
        ],
    ]
    if "accuracy" in h:
        rows.append(["task accuracy (exact match)", h["accuracy"]])
    return ["## Headline", ""] + _table(["", "value"], rows)


def _versus(p: dict) -> list[str]:
    base, ar = p["points"][0], p["autoregressive"]
    m, floor = base["measured"], base.get("roofline", {})
    lines = [
        "## Diffusion against the autoregressive baseline",
        "",
        f"Baseline: {ar['how']}. {ar['note'].capitalize()}. Both sides are credited "
        "with the gen_length positions they fill; the autoregressive rate includes its "
        "prefill.",
        "",
    ]
    rows = [
        [
            "diffusion step",
            m["canvas_length"],
            m["forward"].get("median_ms"),
            floor.get("floor_ms"),
            floor.get("bound"),
            m["tokens_per_forward"],
            m["tokens_per_second"].get("median"),
            floor.get("predicted_tokens_per_second"),
        ]
    ]
    arm, arf = ar.get("measured") or {}, ar.get("roofline", {})
    rows.append(
        [
            "autoregressive token",
            1,
            (arm.get("token") or {}).get("median_ms"),
            arf.get("floor_ms"),
            arf.get("bound"),
            1.0,
            (arm.get("tokens_per_second") or {}).get("median"),
            arf.get("predicted_tokens_per_second"),
        ]
    )
    return lines + _table(
        [
            "forward",
            "tokens in the forward",
            "measured ms",
            "floor ms",
            "bound",
            "TPF",
            "measured tokens/s",
            "roofline tokens/s",
        ],
        rows,
    )


def _moe(p: dict) -> list[str]:
    moe = p.get("moe")
    if not moe:
        return []
    d, t = moe["diffusion_step"], moe["autoregressive_token"]
    lines = [
        "## MoE: bytes moved per forward",
        "",
        f"{moe['moe_layers']} MoE layers, {moe['experts']} experts of "
        f"{moe['expert_bytes_each'] / 1e6:.3g} MB each, top-{moe['top_k']}. A full canvas "
        "reaches nearly every expert each step; one autoregressive token reads only its "
        "top-k.",
        "",
    ]

    def measured(side):
        hits = side.get("measured_hit_per_layer")
        return ", ".join(f"{h:.2f}" for h in hits) if hits else "–"

    rows = [
        ["tokens in the forward", d["tokens"], t["tokens"]],
        [
            "experts hit per layer (uniform routing)",
            d["experts_hit_per_layer"],
            t["experts_hit_per_layer"],
        ],
        ["experts hit per layer (measured router)", measured(d), measured(t)],
        [
            "routed expert MB (uniform)",
            d["expert_bytes"] / 1e6,
            t["expert_bytes"] / 1e6,
        ],
        [
            "routed expert MB (measured)",
            (d.get("measured_expert_bytes") or 0) / 1e6,
            (t.get("measured_expert_bytes") or 0) / 1e6,
        ],
        ["other weights MB", d["other_bytes"] / 1e6, t["other_bytes"] / 1e6],
        ["KV cache MB", 0.0, t["kv_cache_bytes"] / 1e6],
        ["total MB per forward", d["total_bytes"] / 1e6, t["total_bytes"] / 1e6],
        [
            "MB per generated token",
            d["total_bytes"] / 1e6 / max(p["headline"]["tokens_per_forward"], 1e-9),
            t["total_bytes"] / 1e6,
        ],
    ]
    return lines + _table(["", "diffusion step", "autoregressive token"], rows)


def _sweeps(p: dict) -> list[str]:
    series = [
        s for s in dict.fromkeys(pt["series"] for pt in p["points"]) if s != "baseline"
    ]
    lines = []
    ar_rate = p["headline"].get("autoregressive_tokens_per_second")
    for key in series:
        lines += [f"## Sweep: {key}", ""]
        if key == "cache":
            lines += [
                "Each cache mode beside `none` and the autoregressive baseline of the same "
                "graphs. The floor is that of the whole generation in the mode (full "
                "forwards for refreshes and the prefill, cached-step floors for the rest).",
                "",
            ]
        rows = []
        for pt in (x for x in p["points"] if x["series"] == key):
            m, floor = pt["measured"], pt.get("roofline", {})
            rate = m["tokens_per_second"].get("median")
            rows.append(
                [
                    str(pt["value"]),
                    *([] if key == "cache" else [m.get("cache") or "none"]),
                    m["canvas_length"],
                    m["step"].get("median_ms"),
                    m["step"].get("p90_ms"),
                    m["step"].get("p99_ms"),
                    floor.get("floor_ms"),
                    floor.get("measured_over_floor"),
                    rate,
                    floor.get("predicted_tokens_per_second"),
                    rate / ar_rate if rate and ar_rate else None,
                    m["tokens_per_forward"],
                    m["forwards_per_generation"].get("median"),
                    (pt.get("quality") or {}).get("accuracy"),
                    "; ".join((pt.get("notes") or []) + _rounds_note(pt)),
                ]
            )
        lines += _table(
            [
                key,
                *([] if key == "cache" else ["cache"]),
                "canvas",
                "step ms p50",
                "p90",
                "p99",
                "canvas floor ms",
                "x floor",
                "tokens/s",
                "roofline tokens/s",
                "x autoregressive",
                "TPF",
                "NFE",
                "accuracy",
                "notes",
            ],
            rows,
        )
    return lines


def _everywhere(p: dict) -> list[str]:
    rows = [
        [
            r["profile"],
            r["precision"],
            r["step_floor_ms"],
            r["step_bound"],
            r["token_floor_ms"],
            r["token_bound"],
            r["break_even_tpf"],
            r["predicted_speedup_at_measured_tpf"],
        ]
        for r in p["roofline_everywhere"]
    ]
    return [
        "## Roofline of this model on every shipped profile",
        "",
        "Predictions only (nothing measured): the floor of one diffusion step over the "
        "measured canvas and of one autoregressive token; diffusion breaks even at the "
        "TPF shown.",
        "",
    ] + _table(
        [
            "profile",
            "precision",
            "step floor ms",
            "bound",
            "token floor ms",
            "bound",
            "break-even TPF",
            "speed-up at measured TPF",
        ],
        rows,
    )


def _rounds_note(point: dict) -> list[str]:
    rounds = point.get("rounds_median_ms") or []
    if len(rounds) < 2:
        return []
    return [
        "forward p50 per round "
        + ", ".join(_num(r) for r in rounds)
        + " ms (lowest kept)"
    ]


def _details(p: dict) -> list[str]:
    m = p["points"][0]["measured"]
    ar = p["autoregressive"].get("measured") or {}
    mem = [
        f"- host memory, peak resident set during the diffusion runs: "
        f"{m.get('peak_rss_bytes', 0) / 2**20:.0f} MiB (autoregressive: "
        f"{ar.get('peak_rss_bytes', 0) / 2**20:.0f} MiB)",
        f"- device memory: {m.get('device_memory') or m.get('device_peak_allocated_bytes') or m.get('device_used_bytes')}",
        f"- power: {m.get('power') or m.get('power_mw')}",
        *[f"- baseline: {note}" for note in _rounds_note(p["points"][0])],
        *[
            f"- autoregressive: token {note}".replace("forward ", "")
            for note in _rounds_note(p["autoregressive"])
        ],
        f"- step latency over {m['step'].get('count')} steps of {m['runs']} generations: "
        f"median {_num(m['step'].get('median_ms'))}, p90 {_num(m['step'].get('p90_ms'))}, "
        f"p99 {_num(m['step'].get('p99_ms'))} ms (with fewer than 100 steps p99 is "
        "about the maximum)",
        f"- sample answer: `{m.get('sample_text', '')[:80]!r}`",
    ]
    return ["## Details", ""] + mem + [""]


def render_profile(p: dict, plots: list[str]) -> str:
    target, machine = p["target"], p["machine"]
    s = p["sampler"]
    name = Path(target.get("requested") or target["path"]).name
    lines = [
        f"# Profile: {name} on {p['device_profile']['name']} ({target['backend']})",
        "",
        f"- measured: `{target['path']}` ({target['kind']}, {p['model']['family']}, "
        f"{p['model']['parameters'] / 1e6:.2f}M parameters, {target['precision']}"
        f"{', MoE ' + target['moe_strategy'] if target.get('moe_strategy') else ''})",
        f"- device profile: {p['device_profile']['description']} "
        f"({p['device_profile']['bandwidth_gbs']} GB/s, peaks {p['device_profile']['peak_tflops']} TFLOPS)",
        f"- measured on: {machine['processor']}, {machine['load_before']['cpus']} CPUs, "
        f"threads {machine['threads'] or 'default'}, 1-minute load "
        f"{_num(machine['load_before']['load_average_1min'])} before / "
        f"{_num(machine['load_after']['load_average_1min'])} after; each backend in its "
        f"own process: {machine['isolated_processes']}",
        f"- sampler: {s['algorithm']}, gen_length {s['gen_length']}, steps {s['steps']}, "
        f"block_length {s['block_length']}, threshold {s['threshold']}, temperature "
        f"{s['temperature']}; {len(p['prompts'])} prompts, batch 1",
        f"- created {p['created']}",
    ]
    if p.get("command"):
        lines += ["", "```", p["command"], "```"]
    lines.append("")
    lines += (
        _headline(p) + _versus(p) + _moe(p) + _sweeps(p) + _everywhere(p) + _details(p)
    )
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    lines += ["## Not run", ""] + [f"- {item}" for item in p.get("not_run", [])] + [""]
    return "\n".join(lines)


def render_compare(
    rows: list[dict], plot: str, preface: list[str] | None = None
) -> str:
    lines = ["# Profiles side by side", "", *(preface or [])]
    lines += _table(
        [
            "profile",
            "step ms",
            "floor ms",
            "x floor",
            "bound",
            "diffusion tok/s",
            "AR tok/s",
            "diffusion / AR",
            "TPF",
            "NFE",
            "accuracy",
            "load",
        ],
        [
            [
                r["label"],
                r.get("step_ms_median"),
                r.get("step_floor_ms"),
                r.get("measured_over_floor"),
                r.get("bound") or "–",
                r.get("diffusion_tokens_per_second"),
                r.get("autoregressive_tokens_per_second"),
                r.get("diffusion_over_autoregressive"),
                r.get("tokens_per_forward"),
                r.get("forwards_per_generation"),
                r.get("accuracy"),
                r.get("machine_load"),
            ]
            for r in rows
        ],
    )
    lines += [
        f"![{plot}]({plot})",
        "",
        "Reports: "
        + ", ".join(f"[{r['label']}]({r['source']}/README.md)" for r in rows),
        "",
    ]
    return "\n".join(lines)
