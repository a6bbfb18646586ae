"""Throughput of ``dllm-export serve`` against the number of concurrent clients.

Starts the server (a real uvicorn process) on an artifact, then for each concurrency C runs C
client threads, each sending chat completions one after another (closed loop) until
``--requests`` have been answered in all, and reports requests/s, completion tokens/s,
latency and how many requests the server put into each denoise call (from /metrics).
Each artifact's server (its ``--max-batch`` is the artifact's fixed batch) runs alone on the
machine, one after another.

    dllm-export export dllm_export/data/default-model -o out/dm48b1 --seq-len 48 --batch 1
    dllm-export export dllm_export/data/default-model -o out/dm48b4 --seq-len 48 --batch 4
    python -m benchmarks.bench_serve out/dm48b1 out/dm48b4 --concurrency 1 2 4 8
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from benchmarks._common import ROOT, emit

# prompts in the default model's task formats (docs/default-model.md)
PROMPTS = ["Sort: 3 9 1 4", "Reverse: red blue green", "Sort: 8 2 6", "What is 12 + 34?",
           "Reverse: one two three four", "Sort: 5 1 7 3 2", "What is 7 + 25?", "Sort: 4 4 1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def start_server(artifact: str, threads: int | None, batch_wait: float):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "dllm_export.cli", "serve", artifact, "--port", str(port),
               "--max-queue", "1024", "--timeout", "600",
               "--batch-wait", str(batch_wait)]
    if threads:
        command += ["--threads", str(threads)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


def run_clients(url: str, model: str, concurrency: int, requests: int, max_tokens) -> dict:
    latencies, tokens, failures = [], [], []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client(index: int):
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    number = next(counter, None)
                if number is None:
                    return
                body = {"model": model, "temperature": 0,
                        "messages": [{"role": "user",
                                      "content": PROMPTS[number % len(PROMPTS)]}]}
                if max_tokens:
                    body["max_tokens"] = max_tokens
                started = time.perf_counter()
                response = http.post(url + "/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code != 200:
                        failures.append(response.text[:200])
                        continue
                    latencies.append(elapsed)
                    tokens.append(response.json()["usage"]["completion_tokens"])

    batches = _metric(url, "dllm_batch_rows_count")
    forwards = _metric(url, "dllm_forwards_total")
    started = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    batches = _metric(url, "dllm_batch_rows_count") - batches
    latencies.sort()
    return {
        "concurrency": concurrency, "requests": len(latencies), "failures": len(failures),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 3),
        "tokens_per_s": round(sum(tokens) / seconds, 2),
        "latency_median_s": round(statistics.median(latencies), 4) if latencies else None,
        "latency_p90_s": round(latencies[(9 * len(latencies)) // 10], 4) if latencies else None,
        "requests_per_denoise_call": round(len(latencies) / max(batches, 1), 3),
        "forwards": int(_metric(url, "dllm_forwards_total") - forwards),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="Artifact or engine directories.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=32, help="Answered requests per point.")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="Server's intra-op threads.")
    parser.add_argument("--batch-wait", type=float, default=0.01)
    args = parser.parse_args(argv)
    results = []
    for artifact in args.artifacts:
        model = Path(artifact).resolve().name
        proc, url = start_server(artifact, args.threads, args.batch_wait)
        max_batch = httpx.get(url + "/health").json()["max_batch"]
        try:
            run_clients(url, model, 1, 4, args.max_tokens)  # warm-up
            for concurrency in args.concurrency:
                point = {"artifact": model, "max_batch": max_batch,
                         **run_clients(url, model, concurrency, args.requests, args.max_tokens)}
                emit(point)
                results.append(point)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    emit({"benchmark": "serve", "artifacts": args.artifacts, "cpu_count": os.cpu_count(),
          "load_average": os.getloadavg(), "results": results})


if __name__ == "__main__":
    main()
