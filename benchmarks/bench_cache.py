"""Cached decoding on ONNX Runtime CPU: one step against one full forward, and generation
speed per cache mode, measured side by side and interleaved in one process.

    python -m benchmarks.bench_cache --families llada llada-moe --threads 1
    python -m benchmarks.bench_cache --model DIR --seq-len 96 --gen 16 --block 16

Without ``--model`` a random checkpoint of about 100 M parameters per family is written in
its real format (``make-tiny`` with the sizes below) and exported with ``--cache``.

* ``step``: the step graph (``--block`` query rows over a cache of ``--seq-len`` slots)
  against the canvas graph over ``--seq-len`` positions; per round, the median of
  ``--repeats`` calls of each, alternating; the ratio of each round; min / median of the
  round ratios.
* ``generation``: ``--gen`` tokens in blocks of ``--block`` for each cache mode, with the
  schedule (``--steps``) and with Fast-dLLM threshold 0.9; in each round every setting runs
  once, in turn; tokens/s per round and the ratio to ``none`` of the same round. The
  loop's host overhead (selection, bookkeeping, copies: step time not spent in the
  backend) and the bytes copied per forward are reported beside.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks._common import emit

# About 100 M parameters each, in the families' real formats (vocabulary 16k).
SIZES = {
    "llada": {"d_model": 768, "n_heads": 12, "n_kv_heads": 12, "n_layers": 12,
              "mlp_hidden_size": 2048, "vocab_size": 16384, "embedding_size": 16384},
    # 8 layers of 8 experts (width 768, top-2): 101 M parameters, 31 M active per token
    "llada-moe": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                  "num_key_value_heads": 8, "num_experts": 8, "num_experts_per_tok": 2,
                  "expert_intermediate_size": 768, "dense_intermediate_size": 2048,
                  "moe_layer_freq": [1] * 8, "vocab_size": 16384},
}
MODES = ("none", "prefix", "dual")


def make_artifact(work: Path, family: str, model: str | None, seq_len: int, block: int,
                  gen: int, moe: str) -> Path:
    from dllm_export.export.onnx import ExportOptions, export_model
    from dllm_export.models.tiny import make_tiny

    if model is None:
        model = work / f"{family}-100m"
        if not (Path(model) / "config.json").is_file():
            make_tiny(family, model, dtype="float32", shards=1, overrides=SIZES[family],
                      overwrite=True)
    out = work / f"{Path(model).name}-L{seq_len}-b{block}-w{gen}-{moe}-cached"
    if not (out / "manifest.json").is_file():
        export_model(model, out, ExportOptions(seq_len=seq_len, moe=moe, cache=True,
                                               block_length=block, window=gen,
                                               overwrite=True))
    return out


def parameters(artifact: Path) -> int:
    from dllm_export.jsonio import read_json
    from dllm_export.model_shape import model_shape

    manifest = read_json(artifact / "manifest.json")
    return model_shape(manifest["source"]["config"], manifest["family"]).total_parameters()


def _median_ms(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - started))
    return statistics.median(samples)


def step_against_canvas(generator, block: int, rounds: int, repeats: int) -> dict:
    """One step graph call against one canvas graph call, alternating per round."""
    from dllm_export.runtime.attention import cached_mask, canvas_mask, rope_positions

    backend = generator.backend
    length = backend.seq_len
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, 200, size=(1, length))
    start = length - block
    canvas[:, start:] = generator.special.mask_id
    real = np.ones_like(canvas, dtype=bool)
    positions = rope_positions(real, "absolute")
    backend.reset_cache(1, length)
    backend.prefill(canvas, positions, canvas_mask("bidirectional", real))
    valid = np.ones_like(real)
    queries = np.arange(start, length)[None]
    rows = backend.rows_for(block)
    queries = np.pad(queries, ((0, 0), (0, rows - block)), constant_values=-1)
    mask = cached_mask("bidirectional", queries, valid, real)
    ids = np.take_along_axis(canvas, np.maximum(queries, 0), 1)
    pos = np.take_along_axis(positions, np.maximum(queries, 0), 1)
    attention = np.ones_like(canvas)
    for _ in range(2):  # warm-up
        backend.predict(canvas, attention)
        backend.cached_step(ids, pos, mask)
    per_round = []
    for _ in range(rounds):
        full = _median_ms(lambda: backend.predict(canvas, attention), repeats)
        step = _median_ms(lambda: backend.cached_step(ids, pos, mask), repeats)
        per_round.append({"canvas_ms": round(full, 3), "step_ms": round(step, 3),
                          "ratio": round(full / step, 2)})
    ratios = [r["ratio"] for r in per_round]
    return {"block": block, "cache_slots": length, "rounds": per_round,
            "ratio_min": min(ratios), "ratio_median": statistics.median(ratios)}


def generation(generator, prompt, gen: int, block: int, steps: int, rounds: int) -> dict:
    from dllm_export import families
    from dllm_export.runtime.generate import denoise

    family = families.family(generator.family)
    settings = [(mode, threshold) for threshold in (None, 0.9) for mode in MODES]
    rows = {s: [] for s in settings}
    for mode in MODES:  # every graph's session and buffers made before anything is timed
        denoise(generator.backend, [prompt], generator.config(
            algorithm="llada", gen_length=gen, block_length=block, steps=gen // block * 2,
            cache=mode, early_exit=False), generator.special, family=family)
    for _ in range(rounds):
        for mode, threshold in settings:
            config = generator.config(algorithm="llada", gen_length=gen, block_length=block,
                                      steps=gen if threshold else steps, threshold=threshold,
                                      cache=mode, early_exit=False)
            before = dict(generator.backend.bytes_moved)
            result = denoise(generator.backend, [prompt], config, generator.special,
                             family=family)
            moved = {k: generator.backend.bytes_moved[k] - before[k] for k in before}
            rows[(mode, threshold)].append({
                "tokens_per_second": gen / result.seconds, "forwards": result.forwards,
                "seconds": result.seconds,
                # the loop's own time (selection, masks, bookkeeping, copies) over the whole
                "host_overhead": 1 - sum(result.forward_seconds) / result.seconds,
                "bytes_per_forward": {k: v / result.forwards for k, v in moved.items()},
            })
    out = []
    for (mode, threshold), runs in rows.items():
        none_runs = rows[("none", threshold)]
        ratios = [r["tokens_per_second"] / n["tokens_per_second"]
                  for r, n in zip(runs, none_runs, strict=True)]
        out.append({
            "cache": mode, "threshold": threshold, "steps": gen if threshold else steps,
            "tokens_per_second": [round(r["tokens_per_second"], 2) for r in runs],
            "forwards": runs[0]["forwards"],
            "over_none": [round(x, 2) for x in ratios],
            "over_none_min": round(min(ratios), 2),
            "host_overhead_max": round(max(r["host_overhead"] for r in runs), 4),
            "bytes_per_forward": {k: round(v) for k, v in runs[-1]["bytes_per_forward"].items()},
        })
    return {"gen_length": gen, "block": block, "rounds": rounds, "results": out}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="+", default=list(SIZES))
    parser.add_argument("--model", default=None, help="a checkpoint instead of generated ones")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128, help="scheduled steps (no threshold)")
    parser.add_argument("--moe", default="dense")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("out/bench"))
    args = parser.parse_args()

    from dllm_export.runtime import Generator

    models = [(None, args.model)] if args.model else [(f, None) for f in args.families]
    for family, model in models:
        artifact = make_artifact(args.work, family, model, args.seq_len, args.block,
                                 args.gen, args.moe)
        generator = Generator.from_artifact(artifact, threads=args.threads)
        record = {"benchmark": "cache", "artifact": str(artifact),
                  "family": generator.family, "parameters": parameters(artifact),
                  "threads": args.threads, "seq_len": args.seq_len,
                  "step": step_against_canvas(generator, args.block, args.rounds, args.repeats)}
        emit(record)
        if not args.skip_generation:
            rng = np.random.default_rng(1)
            prompt = [int(t) for t in rng.integers(0, 200, size=args.seq_len - args.gen)]
            record["generation"] = generation(generator, prompt, args.gen, args.block,
                                              args.steps, args.rounds)
            emit(record)


if __name__ == "__main__":
    main()
