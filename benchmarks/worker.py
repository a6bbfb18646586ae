"""One measurement in its own process: denoiser step latency and a full generation.

    python -m benchmarks.worker ort ARTIFACT_DIR --threads 2
    python -m benchmarks.worker torch CHECKPOINT_DIR --seq-len 256 --threads 2

Prints one JSON line. The step is timed on a canvas whose response half is masked; the
generation fills ``seq_len / 2`` tokens, 4 per step, in blocks of 32.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks._common import emit, peak_rss_bytes, timed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("backend", choices=["ort", "torch"])
    parser.add_argument("path")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--moe", default=None, help="torch only: MoE strategy (default eager)")
    parser.add_argument("--no-generate", action="store_true")
    args = parser.parse_args()

    from dllm_export.runtime import Generator

    if args.backend == "ort":
        generator = Generator.from_artifact(args.path, threads=args.threads)
        seq_len = generator.backend.seq_len
    else:
        import torch

        torch.set_num_threads(args.threads)
        generator = Generator.from_checkpoint(args.path, moe=args.moe)
        seq_len = args.seq_len
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, size=(1, seq_len))
    ids[:, seq_len // 2:] = generator.special.mask_id
    mask = np.ones_like(ids)
    record = {"backend": args.backend, "seq_len": seq_len, "threads": args.threads,
              "step": timed(lambda: generator.backend.predict(ids, mask), repeats=args.repeats)}
    if not args.no_generate:
        gen_length = seq_len // 2
        prompt = [int(t) for t in rng.integers(0, 200, size=seq_len - gen_length)]
        config = generator.config(gen_length=gen_length, steps=gen_length // 4,
                                  block_length=min(32, gen_length), early_exit=False,
                                  algorithm="llada")
        from dllm_export.runtime.generate import denoise

        result = denoise(generator.backend, [prompt], config, generator.special)
        record["generation"] = {"gen_length": gen_length, "forwards": result.forwards,
                                "seconds": round(result.seconds, 3),
                                "tokens_per_second": round(gen_length / result.seconds, 2)}
    record["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
    emit(record)


if __name__ == "__main__":
    main()
