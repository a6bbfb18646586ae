"""The GPU validation suite's plan, runner and report (``gpu_checks.py suite``, which
scripts/gpu_suite.sh calls). Written for the validation machine (an H200 with PyTorch CUDA,
onnx, onnxruntime for the CPU, cuda-bindings and cupy; no TensorRT, no network), and using
TensorRT where it imports.

Each step runs in its own process under a time limit, inside one budget for the whole run
(450 s by default: the suite stays under 8 minutes). Each prints one JSON line per check,
all collected in ``RESULTS``; ``ok`` is true (validated), false (failed) or null (not run
or not validated: a skipped GPU test is never a pass). The run ends with a summary line and
writes its section of docs/gpu-validation.md (date, card, one row per check).

``--dry-run`` runs nothing: it prints the step it would run as JSON lines (command and time
limit) and writes the report section it would write, so the plan is tested on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKS = "scripts/gpu_checks.py"
DEFAULT_MODEL = "dllm_export/data/llada-moe-tasks"  # the masked-diffusion model: cache modes
BUDGET_S = 450
MIN_STEP_S = 15  # a step with less left than this is not started
BEGIN, END = "<!-- gpu-suite:begin -->", "<!-- gpu-suite:end -->"
# what a profile step must report: the step, its roofline floor on h200 and the
# autoregressive baseline of the same forward; with the full canvas (--cache none) also the
# measured step over that floor (profile compares only full-canvas forwards with it)
PROFILE_KEYS = ("step_ms_median", "step_floor_ms", "autoregressive_tokens_per_second",
                "diffusion_over_autoregressive")


@dataclass
class Step:
    name: str
    argv: list
    timeout: int
    kind: str = "check"  # check: prints its JSON line; profile, pytest, cli: parsed here
    after: tuple = field(default_factory=tuple)  # steps that must have passed first


def tensorrt_status(python: str) -> tuple[bool, str]:
    """Whether ``import tensorrt`` works here, and its version or the reason it does not."""
    probe = subprocess.run([python, "-c", "import tensorrt; print(tensorrt.__version__)"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode == 0:
        return True, probe.stdout.strip()
    last = (probe.stderr.strip().splitlines() or ["no error text"])[-1]
    return False, f"import tensorrt failed ({last[:160]})"


def plan(work: Path, python: str, tensorrt: bool, ort_trt: bool) -> list[Step]:
    """The steps, in order of priority (the budget cuts from the end)."""
    checks, cli = [python, CHECKS], [python, "-m", "dllm_export.cli"]
    steps = [Step("env", [*checks, "env"], 60),
             Step("cuda_runtime", [*checks, "cuda-runtime"], 90),
             Step("trt_loop", [*checks, "trt-loop"], 90),
             Step("make_1b", [*checks, "make-1b", str(work / "llada-1b")], 90)]
    for model, checkpoint in (("default", DEFAULT_MODEL), ("1b", str(work / "llada-1b"))):
        for cache in ("none", "dual"):
            steps.append(Step(
                f"profile_{model}_{cache}",
                [*cli, "profile", checkpoint, "--profile", "h200", "--backend", "torch",
                 "--device", "cuda", "--dtype", "bf16", "--cache", cache, "--runs", "3",
                 "--warmup", "1", "--quality", "off", "--in-process", "--json",
                 "-o", str(work / f"profile-{model}-{cache}")],
                90, kind="profile", after=("make_1b",) if model == "1b" else ()))
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    steps += [Step("pytest_cuda", [*pytest, f"--junitxml={work / 'cuda.xml'}",
                                   "tests/test_cuda.py"], 90, kind="pytest"),
              Step("pytest_gpu", [*pytest, f"--junitxml={work / 'gpu.xml'}", "-m", "gpu",
                                  "tests/test_build.py"], 180, kind="pytest")]
    if not tensorrt:
        return steps
    for family in ("llada", "llada-moe"):
        tiny, artifact = work / family, work / f"{family}-onnx"
        steps += [Step(f"make_tiny_{family}", [*cli, "make-tiny", str(tiny), "--family",
                                               family, "--overwrite"], 60, kind="cli"),
                  Step(f"export_{family}", [*cli, "export", str(tiny), "-o", str(artifact),
                                            "--seq-len", "64", "--cache", "--block-length",
                                            "16", "--window", "32", "--target", "tensorrt",
                                            "--overwrite"], 120, kind="cli",
                       after=(f"make_tiny_{family}",))]
        # fp32 from the fp32 export, and the profile's bf16 from the same export: TensorRT
        # 10 lowers it with the BF16 flag, 11 builds the cast graph; the manifest says which
        for precision in ("fp32", "bf16"):
            engine = work / f"{family}-trt-{precision}"
            built = f"build_{family}_{precision}"
            steps += [Step(built, [*cli, "build", str(artifact), "--profile", "h200", "-o",
                                   str(engine), "--precision", precision, "--overwrite"],
                           180, kind="cli", after=(f"export_{family}",)),
                      Step(f"compare_{family}_{precision}", [*checks, "compare", str(artifact),
                                                             str(engine)], 90, after=(built,))]
        steps.append(Step(f"cached_{family}_fp32", [*checks, "cached", str(artifact),
                                                    str(work / f"{family}-trt-fp32")], 120,
                          after=(f"build_{family}_fp32",)))
        if ort_trt:
            steps.append(Step(f"build_{family}_ort_trt",
                              [*cli, "build", str(artifact), "--profile", "h200", "-o",
                               str(work / f"{family}-ort-trt"), "--via", "ort-trt",
                               "--precision", "fp16", "--overwrite"], 180, kind="cli",
                              after=(f"export_{family}",)))
    return steps


def pytest_outcome(name: str, junit: Path, returncode: int) -> dict:
    """A pytest step's line: failed if anything failed, validated only if every selected
    test passed; a skipped test leaves it not validated (ok null), never passed."""
    if not junit.is_file():
        return {"check": name, "ok": False, "returncode": returncode,
                "reason": "pytest wrote no report (not installed, or it crashed)"}
    suites = ElementTree.parse(junit).getroot()
    cases = list(suites.iter("testcase"))
    skipped = [f"{c.get('name')}: {c.find('skipped').get('message', '')}"[:160]
               for c in cases if c.find("skipped") is not None]
    failed = [c.get("name") for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    passed = len(cases) - len(skipped) - len(failed)
    ok = False if failed or returncode not in (0, 5) else (
        True if passed and not skipped else None)
    line = {"check": name, "ok": ok, "passed": passed, "failed": failed,
            "skipped": len(skipped)}
    if skipped:
        line["not_validated"] = skipped
    if ok is None:
        line["reason"] = (f"{len(skipped)} GPU test(s) skipped: not validated" if skipped
                          else "no test selected: nothing validated")
    return line


def profile_outcome(name: str, stdout: str, returncode: int) -> dict:
    """The headline ``profile --json`` printed (step time, roofline, autoregressive)."""
    start = stdout.find("{")
    try:
        headline = json.loads(stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        headline = None
    if returncode != 0 or not isinstance(headline, dict):
        return {"check": name, "ok": False, "returncode": returncode}
    keys = PROFILE_KEYS + (("measured_over_floor",) if name.endswith("_none") else ())
    missing = [key for key in keys if headline.get(key) is None]
    line = {"check": name, "ok": not missing, **headline}
    if missing:
        line["reason"] = f"the headline lacks {', '.join(missing)}"
    return line


def run_step(step: Step, seconds: float) -> list[dict]:
    started = time.monotonic()
    try:
        done = subprocess.run(step.argv, capture_output=True, text=True, timeout=seconds,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return [{"check": step.name, "ok": False, "reason": f"timed out after {seconds:.0f} s"}]
    elapsed = round(time.monotonic() - started, 1)
    tail = " ".join((done.stdout + done.stderr).strip().splitlines()[-3:])[-400:]
    if step.kind == "pytest":
        junit = Path(step.argv[[a.startswith("--junitxml") for a in step.argv].index(True)]
                     .split("=", 1)[1])
        lines = [pytest_outcome(step.name, junit, done.returncode)]
    elif step.kind == "profile":
        lines = [profile_outcome(step.name, done.stdout, done.returncode)]
    else:
        lines = [json.loads(line) for line in done.stdout.splitlines()
                 if line.startswith('{"check"')]
        if len(lines) == 1 and step.kind == "check":
            lines[0]["check"] = step.name  # compare_llada_fp32, not compare
        if step.kind == "cli" or not lines:
            lines.append({"check": step.name, "ok": done.returncode == 0})
    for line in lines:
        line.setdefault("seconds", elapsed)
        if line.get("ok") is False:
            line.setdefault("log_tail", tail)
    return lines


def summarize(results: list[dict]) -> dict:
    named = [r for r in results if r.get("check") != "summary"]
    failed = [r["check"] for r in named if r.get("ok") is False]
    unvalidated = [r["check"] for r in named if r.get("ok") is None]
    return {"check": "summary", "ok": not failed, "validated": sum(
        r.get("ok") is True for r in named), "failed": failed, "not_validated": unvalidated}


def report_section(results: list[dict], dry_run: bool, budget: int) -> str:
    env = next((r for r in results if r.get("check") == "env"), {})
    card = env.get("gpu", "unknown")
    if env.get("compute_capability"):
        card += (f" (compute capability {env['compute_capability']}, "
                 f"{env.get('memory_gib')} GiB, CUDA runtime {env.get('cuda_runtime')})")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = ["## Last run", "",
            f"{'Dry run (nothing executed)' if dry_run else 'Run'} on {date}; card: {card}; "
            f"budget {budget} s.", ""]
    if env and not dry_run:
        head += ["Versions: " + ", ".join(f"{k} {env.get(k)}" for k in
                 ("torch", "torch_cuda", "cuda.bindings", "cupy", "onnxruntime", "tensorrt")),
                 ""]
    rows = ["| check | ok | details |", "|---|---|---|"]
    for line in results:
        extra = {k: v for k, v in line.items() if k not in ("check", "ok", "log_tail")}
        text = json.dumps(extra, default=str)
        text = text if len(text) <= 300 else text[:297] + "..."
        mark = {True: "yes", False: "**no**", None: "not validated"}[line.get("ok")]
        rows.append(f"| `{line['check']}` | {mark} | `{text.replace('|', '/')}` |")
    return "\n".join([BEGIN, *head, *rows, "", END])


def write_report(doc: Path, section: str) -> None:
    text = doc.read_text() if doc.is_file() else "# GPU validation\n\n"
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        text = before + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_checks.py suite")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dllm-gpu-suite"))
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--doc", type=Path, default=None,
                        help="default: docs/gpu-validation.md (a dry run: WORK's copy)")
    parser.add_argument("--budget", type=int, default=BUDGET_S)
    args = parser.parse_args(argv)
    python = sys.executable
    results_path = args.results or args.work / "gpu_suite.jsonl"
    if args.doc is None:
        args.doc = (args.work if args.dry_run else ROOT / "docs") / "gpu-validation.md"
    args.work.mkdir(parents=True, exist_ok=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def record(line: dict) -> None:
        results.append(line)
        text = json.dumps(line, default=str)
        print(text, flush=True)
        with open(results_path, "a") as handle:
            handle.write(text + "\n")

    results_path.write_text("")
    tensorrt, why = tensorrt_status(python)
    ort_trt = _has_ort_trt(python)
    deadline = time.monotonic() + args.budget
    passed: set = set()
    for step in plan(args.work, python, tensorrt, ort_trt):
        if args.dry_run:
            record({"check": step.name, "ok": None, "dry_run": True, "kind": step.kind,
                    "command": shlex.join(step.argv), "timeout_s": step.timeout,
                    "after": list(step.after)})
            continue
        left = deadline - time.monotonic()
        missing = [name for name in step.after if name not in passed]
        if missing or left < MIN_STEP_S:
            record({"check": step.name, "ok": None, "reason": (
                f"not run: {', '.join(missing)} did not pass" if missing else
                f"not run: the suite's {args.budget} s budget was spent")})
            continue
        for line in run_step(step, min(step.timeout, left)):
            record(line)
            if line.get("ok") is True and line["check"] == step.name:
                passed.add(step.name)
    if not tensorrt:
        record({"check": "tensorrt", "ok": None, "reason": f"{why}: no engine built or run "
                "(TensorRT and onnxruntime-gpu cannot be installed on this machine)"})
    summary = summarize(results)
    if args.dry_run:
        summary.update(dry_run=True, planned=len(results) - (not tensorrt),
                       budget_s=args.budget)
    record(summary)
    write_report(args.doc, report_section(results, args.dry_run, args.budget))
    if os.environ.get("OUT"):  # the device tool brings back what is under $OUT only
        out = Path(os.environ["OUT"]) / "gpu-validation.md"
        out.write_text(args.doc.read_text())
    return 0 if summary["ok"] else 1


def _has_ort_trt(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import onnxruntime as o, sys; sys.exit("
                            "'TensorrtExecutionProvider' not in o.get_available_providers())"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0
