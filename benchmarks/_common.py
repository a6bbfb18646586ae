"""Shared helpers for benchmarks: timing, peak memory, isolated processes, JSON output.

This VM is noisy and has 2 cores: every measurement is a median over repeats after warm-up,
and backends that compete for threads run in separate processes, one after another.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, warmup: int = 3, repeats: int = 20) -> dict:
    """Median / p10 / p90 milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - started))
    samples.sort()
    return {"median_ms": round(statistics.median(samples), 3),
            "p10_ms": round(samples[len(samples) // 10], 3),
            "p90_ms": round(samples[(9 * len(samples)) // 10], 3),
            "repeats": repeats}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own memory since it started.

    Linux's ``ru_maxrss`` is no measure of a worker: at ``exec`` the kernel keeps the
    high-water mark of the memory the process had before it (``exec_mmap``), and a forked
    child starts with a copy of its parent's, so a worker started by a 1.2 GB benchmark
    reports at least 1.2 GB. ``VmHWM`` in ``/proc/self/status`` is the high-water mark of
    the process's current memory only. Elsewhere: ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# Starts a program from a small process and reports its rusage: what ``ru_maxrss`` of a
# program started from this (large) process would report includes this process's memory.
_LAUNCHER = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"returncode": os.waitstatus_to_exitcode(status),
               "peak_rss": usage.ru_maxrss * 1024}, out)
"""


def run_program(command: list[str], env: dict | None = None) -> dict:
    """Run a program in its own process: returncode, stdout, stderr (bytes), wall seconds
    and its own peak RSS (started from a small launcher, see ``_LAUNCHER``)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dllm-bench-") as scratch:
        report = Path(scratch) / "rusage.json"
        started = time.perf_counter()
        got = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(report), *command],
                             capture_output=True, env=env)
        wall = time.perf_counter() - started
        measured = json.loads(report.read_text())
    return {**measured, "stdout": got.stdout, "stderr": got.stderr, "wall_seconds": wall}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_isolated(module: str, *args: str) -> dict:
    """Run ``python -m module args`` in a fresh process and parse its last JSON line."""
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                            text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
