"""scripts/gpu_suite.sh and gpu_suite.py on the CPU: the dry run's plan and the JSON and
report it writes, and the rules that turn step outputs into results (a skipped GPU test is
not validated, never passed; the time budget stops the run)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
suite = importlib.import_module("gpu_suite")

EXPECTED = ["env", "cuda_runtime", "trt_loop", "make_1b", "profile_default_none",
            "profile_default_dual", "profile_1b_none", "profile_1b_dual", "pytest_cuda",
            "pytest_gpu"]


def _has_tensorrt() -> bool:
    return suite.tensorrt_status(sys.executable)[0]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("suite")
    out = work / "out"
    env = {**os.environ, "WORK": str(work / "w"), "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu_suite.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done, lines, work


def test_dry_run_plans_every_check_with_its_command(dry_run):
    done, lines, work = dry_run
    assert done.returncode == 0, done.stderr
    names = [line["check"] for line in lines]
    assert names[:len(EXPECTED)] == EXPECTED and names[-1] == "summary"
    planned = {line["check"]: line for line in lines
               if line.get("dry_run") and line["check"] != "summary"}
    for name, line in planned.items():
        assert line["ok"] is None and line["timeout_s"] > 0, name
    assert planned["cuda_runtime"]["command"].endswith("scripts/gpu_checks.py cuda-runtime")
    assert planned["trt_loop"]["command"].endswith("scripts/gpu_checks.py trt-loop")
    for model in ("default", "1b"):
        for cache in ("none", "dual"):
            command = planned[f"profile_{model}_{cache}"]["command"]
            assert (" profile " in command and "--profile h200 --backend torch --device cuda"
                    in command and f"--cache {cache}" in command and "--json" in command)
    assert planned["profile_1b_none"]["after"] == ["make_1b"]
    assert "dllm_export/data/llada-moe-tasks" in planned["profile_default_none"]["command"]
    assert "-m gpu tests/test_build.py" in planned["pytest_gpu"]["command"]
    summary = lines[-1]
    assert summary["dry_run"] and summary["failed"] == [] and summary["budget_s"] <= 480
    # the results file holds exactly the printed lines
    results = (work / "out" / "gpu_suite.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in results] == lines


def test_dry_run_without_tensorrt_builds_nothing_and_says_why_in_one_line(dry_run):
    if _has_tensorrt():
        pytest.skip("tensorrt imports here")
    _, lines, _ = dry_run
    names = [line["check"] for line in lines]
    assert not any(name.startswith(("build_", "export_", "compare_")) for name in names)
    why = next(line for line in lines if line["check"] == "tensorrt")
    assert why["ok"] is None and why["reason"].startswith("import tensorrt failed (")
    assert "\n" not in why["reason"]


def test_dry_run_writes_its_report_section_not_the_docs(dry_run):
    _, lines, work = dry_run
    report = (work / "w" / "gpu-validation.md").read_text()
    assert suite.BEGIN in report and suite.END in report
    assert "Dry run (nothing executed) on 20" in report and " UTC; card: " in report
    assert all(f"| `{line['check']}` |" in report for line in lines)
    assert (work / "out" / "gpu-validation.md").read_text() == report  # $OUT's copy


def test_plan_with_tensorrt_builds_fp32_and_bf16_from_the_fp32_export(tmp_path):
    steps = {step.name: step for step in suite.plan(tmp_path, "python", True, False)}
    for family in ("llada", "llada-moe"):
        export = steps[f"export_{family}"].argv
        assert "--dtype" not in export  # fp32 artifact
        for precision in ("fp32", "bf16"):
            build = steps[f"build_{family}_{precision}"]
            assert build.argv[-3:] == ["--precision", precision, "--overwrite"]
            assert build.after == (f"export_{family}",)
    assert not any(name.endswith("ort_trt") for name in steps)


def _junit(tmp_path, cases: str) -> Path:
    path = tmp_path / "r.xml"
    path.write_text(f'<testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


def test_a_skipped_gpu_test_is_not_validated_never_passed(tmp_path):
    skipped = _junit(tmp_path, '<testcase name="test_engine"><skipped message="no '
                               'tensorrt"/></testcase><testcase name="test_ok"/>')
    line = suite.pytest_outcome("pytest_gpu", skipped, 0)
    assert line["ok"] is None and line["passed"] == 1 and line["skipped"] == 1
    assert line["reason"] == "1 GPU test(s) skipped: not validated"
    assert line["not_validated"] == ["test_engine: no tensorrt"]
    failed = _junit(tmp_path, '<testcase name="t"><failure message="x"/></testcase>')
    assert suite.pytest_outcome("p", failed, 1)["ok"] is False
    passed = _junit(tmp_path, '<testcase name="a"/><testcase name="b"/>')
    assert suite.pytest_outcome("p", passed, 0) == {"check": "p", "ok": True, "passed": 2,
                                                   "failed": [], "skipped": 0}
    nothing = _junit(tmp_path, "")
    assert suite.pytest_outcome("p", nothing, 5)["ok"] is None
    assert suite.pytest_outcome("p", tmp_path / "none.xml", 4)["ok"] is False


def test_summary_counts_failed_and_not_validated_apart():
    summary = suite.summarize([{"check": "a", "ok": True}, {"check": "b", "ok": None},
                               {"check": "c", "ok": False}])
    assert summary == {"check": "summary", "ok": False, "validated": 1, "failed": ["c"],
                       "not_validated": ["b"]}


def test_profile_outcome_reads_the_json_headline():
    headline = {"step_ms_median": 4.5, "step_floor_ms": 0.9, "measured_over_floor": 5.0,
                "autoregressive_tokens_per_second": 300.0,
                "diffusion_over_autoregressive": 0.7}
    stdout = json.dumps(headline, indent=2) + "\n"
    assert suite.profile_outcome("p_none", stdout, 0) == {"check": "p_none", "ok": True,
                                                           **headline}
    # the full canvas must be compared with its floor; a cached step is not, by profile
    off = json.dumps({**headline, "measured_over_floor": None})
    line = suite.profile_outcome("p_none", off, 0)
    assert line["ok"] is False and line["reason"] == "the headline lacks measured_over_floor"
    assert suite.profile_outcome("p_dual", off, 0)["ok"] is True
    assert suite.profile_outcome("p_none", "Traceback", 1)["ok"] is False


def test_run_step_takes_the_check_line_and_enforces_the_timeout(tmp_path):
    line = json.dumps({"check": "compare", "ok": True, "top1_agreement": 1.0})
    step = suite.Step("compare_llada_fp32", [sys.executable, "-c", f"print({line!r})"], 30)
    got = suite.run_step(step, 30)
    assert got[0]["check"] == "compare_llada_fp32" and got[0]["top1_agreement"] == 1.0
    slow = suite.Step("slow", [sys.executable, "-c", "import time; time.sleep(5)"], 30)
    assert suite.run_step(slow, 0.5) == [{"check": "slow", "ok": False,
                                          "reason": "timed out after 0 s"}]
    crash = suite.Step("crash", [sys.executable, "-c", "raise SystemExit('boom')"], 30)
    result = suite.run_step(crash, 30)[0]
    assert result["ok"] is False and "boom" in result["log_tail"]


def test_a_spent_budget_runs_nothing_and_says_so(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# GPU validation\n\nintro\n\n{suite.BEGIN}\nold\n{suite.END}\n\ntail\n")
    code = suite.main(["--work", str(tmp_path / "w"), "--budget", "0", "--doc", str(doc)])
    lines = [json.loads(t) for t in (tmp_path / "w" / "gpu_suite.jsonl").read_text().splitlines()]
    assert code == 0
    spent = "not run: the suite's 0 s budget was spent"
    for line in lines:
        if line["check"] in EXPECTED:  # what waits on make_1b says that instead
            assert line["ok"] is None and line["reason"] in (
                spent, "not run: make_1b did not pass"), line
    assert sum(line.get("reason") == spent for line in lines) == len(EXPECTED) - 2
    text = doc.read_text()
    assert text.startswith("# GPU validation\n\nintro\n\n") and text.endswith("\n\ntail\n")
    assert "old" not in text and "| `env` | not validated |" in text
