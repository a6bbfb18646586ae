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
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
