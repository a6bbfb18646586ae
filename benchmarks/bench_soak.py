"""Soak: many generations in one process with the resident memory sampled, and two
generators in two threads on one artifact against sequential runs.

    python -m benchmarks.bench_soak ARTIFACT --generations 1000

Targets (issue: reliability): RSS flat within 5 % from the first tenth of the run to the
end; the threaded runs commit exactly the sequential runs' tokens at temperature 0.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import threading

from benchmarks._common import current_rss_bytes, emit

PROMPTS = ("What is 123 + 456?", "Sort: 42 7 19 3 88", "Reverse: red cat sun moon",
           "a=37, k=12, x=88. What is x?")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="none")
    args = parser.parse_args()

    from dllm_export.runtime import Generator

    generator = Generator.from_artifact(args.artifact, threads=args.threads)
    samples = []
    every = max(1, args.generations // 50)
    for index in range(args.generations):
        generator.generate(PROMPTS[index % len(PROMPTS)], chat=True, cache=args.cache)
        if index % every == 0 or index == args.generations - 1:
            samples.append((index, current_rss_bytes()))
    settled = [rss for index, rss in samples if index >= args.generations // 10]
    growth = (settled[-1] - settled[0]) / settled[0]
    sequential = [generator.generate(p, chat=True, cache=args.cache).tokens for p in PROMPTS]
    others = [Generator.from_artifact(args.artifact, threads=args.threads) for _ in range(2)]
    threaded = [[None] * len(PROMPTS) for _ in others]

    def work(slot, gen):
        for index, prompt in enumerate(PROMPTS):
            threaded[slot][index] = gen.generate(prompt, chat=True, cache=args.cache).tokens

    workers = [threading.Thread(target=work, args=(i, g)) for i, g in enumerate(others)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    emit({"benchmark": "soak", "artifact": args.artifact, "cache": args.cache,
          "generations": args.generations, "rss_mb_first": round(samples[0][1] / 2**20, 1),
          "rss_mb_settled_start": round(settled[0] / 2**20, 1),
          "rss_mb_end": round(settled[-1] / 2**20, 1), "rss_growth_after_warmup": round(growth, 4),
          "rss_flat_within_5_percent": abs(growth) <= 0.05,
          "threads_match_sequential": all(t == sequential for t in threaded)})


if __name__ == "__main__":
    main()
