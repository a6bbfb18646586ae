"""Throughput of ``dllm-export serve`` against the number of concurrent clients.

Starts the server (a real uvicorn process) on an artifact, then for each concurrency C runs C
client threads, each sending chat completions one after another (closed loop) until
``--requests`` have been answered in all, and reports requests/s, completion tokens/s,
latency and how many requests the server put into each denoise call (from /metrics).
All servers start first (an OpenAI server per artifact and ``--batch-wait``, its
``--max-batch`` the artifact's fixed batch; a Triton server per artifact); only one is sent
requests at a time, and the rounds interleave them, so a change in the machine's load
falls on all of them alike. The summary is the median over rounds.

    dllm-export export dllm_export/data/llada-moe-tasks -o out/dm48b1 --seq-len 48 --batch 1
    dllm-export export dllm_export/data/llada-moe-tasks -o out/dm48b4 --seq-len 48 --batch 4
    python -m benchmarks.bench_serve out/dm48b1 out/dm48b4 --concurrency 1 2 4 8 \
        --batch-wait 0.01 0.1 --threads 1 --triton-venv .venv-triton
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
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


def openai_request(url: str, model: str, max_tokens):
    """One chat completion; returns its completion tokens, or None when it failed."""
    def post(http, prompt):
        body = {"model": model, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]}
        if max_tokens:
            body["max_tokens"] = max_tokens
        response = http.post(url + "/v1/chat/completions", json=body)
        return response.json()["usage"]["completion_tokens"] if response.status_code == 200 else None

    return post


def triton_request(url: str, model: str, max_tokens):
    """One chat request to Triton's generate_stream (one final response, stream false)."""
    params = {"chat": True, "stream": False, "temperature": 0}
    if max_tokens:
        params["max_tokens"] = max_tokens

    def post(http, prompt):
        body = {"text_input": prompt, "sampling_parameters": json.dumps(params)}
        response = http.post(url + f"/v2/models/{model}/generate_stream", json=body)
        events = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: ")]
        if response.status_code != 200 or not events or "error" in events[-1]:
            return None
        return events[-1]["completion_tokens"]

    return post


def run_clients(post, concurrency: int, requests: int, batches_metric=None) -> dict:
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
                started = time.perf_counter()
                count = post(http, PROMPTS[number % len(PROMPTS)])
                elapsed = time.perf_counter() - started
                with lock:
                    if count is None:
                        failures.append(number)
                        continue
                    latencies.append(elapsed)
                    tokens.append(count)

    batches = batches_metric() if batches_metric else 0
    started = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    batches = batches_metric() - batches if batches_metric else None
    latencies.sort()
    return {
        "concurrency": concurrency, "requests": len(latencies), "failures": len(failures),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 3),
        "tokens_per_s": round(sum(tokens) / seconds, 2),
        "latency_median_s": round(statistics.median(latencies), 4) if latencies else None,
        "latency_p90_s": round(latencies[(9 * len(latencies)) // 10], 4) if latencies else None,
        "requests_per_denoise_call": (round(len(latencies) / max(batches, 1), 3)
                                      if batches is not None else None),
    }


def start_triton(artifact: str, model: str, venv: str, threads, work: str):
    """tritonserver (nvidia-pytriton's) on the repository ``dllm-export triton`` writes."""
    from dllm_export.serve.triton import pytriton_server, write_repository

    repository = Path(work) / model / "models"
    write_repository(artifact, repository, name=model, threads=threads)
    ports = [_free_port() for _ in range(3)]
    command, env = pytriton_server(venv, repository, Path(work) / model, *ports)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{ports[0]}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + f"/v2/models/{model}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("tritonserver did not get the model ready")
        time.sleep(0.5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="Artifact or engine directories.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="Answered requests per point.")
    parser.add_argument("--rounds", type=int, default=2,
                        help="Rounds; each measures every server at every concurrency.")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="Servers' intra-op threads.")
    parser.add_argument("--batch-wait", type=float, nargs="+", default=[0.01],
                        help="One OpenAI server per artifact and value.")
    parser.add_argument("--triton-venv", default=None,
                        help="Also measure the Triton repository on this nvidia-pytriton venv.")
    args = parser.parse_args(argv)
    servers, procs = [], []  # (labels, post, batches metric)
    with tempfile.TemporaryDirectory() as work:
        try:
            for artifact in args.artifacts:
                model = Path(artifact).resolve().name
                for wait in args.batch_wait:
                    proc, url = start_server(artifact, args.threads, wait)
                    procs.append(proc)
                    max_batch = httpx.get(url + "/health").json()["max_batch"]
                    servers.append(({"server": "openai", "artifact": model,
                                     "max_batch": max_batch, "batch_wait": wait},
                                    openai_request(url, model, args.max_tokens),
                                    lambda url=url: _metric(url, "dllm_batch_rows_count")))
                if args.triton_venv:
                    proc, url = start_triton(artifact, model, args.triton_venv, args.threads,
                                             work)
                    procs.append(proc)
                    servers.append(({"server": "triton", "artifact": model},
                                    triton_request(url, model, args.max_tokens), None))
            for _, post, _ in servers:
                run_clients(post, 1, 4)  # warm-up
            # every server idles while another is measured: rounds interleave them
            rounds = []
            for round_index in range(args.rounds):
                for concurrency in args.concurrency:
                    for labels, post, batches in servers:
                        point = {**labels, "round": round_index,
                                 **run_clients(post, concurrency, args.requests, batches)}
                        emit(point)
                        rounds.append(point)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
    summary = []
    for labels, _, _ in servers:
        for concurrency in args.concurrency:
            points = [p for p in rounds if p["concurrency"] == concurrency
                      and all(p.get(k) == v for k, v in labels.items())]
            summary.append({**labels, "concurrency": concurrency, **{
                key: round(statistics.median(p[key] for p in points), 3)
                for key in ("requests_per_s", "tokens_per_s", "latency_median_s")},
                "requests_per_denoise_call": statistics.median(
                    p["requests_per_denoise_call"] for p in points)
                if points[0]["requests_per_denoise_call"] is not None else None,
                "failures": sum(p["failures"] for p in points)})
    emit({"benchmark": "serve", "artifacts": args.artifacts, "cpu_count": os.cpu_count(),
          "load_average": os.getloadavg(), "rounds": args.rounds, "requests": args.requests,
          "summary": summary})


if __name__ == "__main__":
    main()
