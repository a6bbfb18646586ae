"""Reproduce the README's headline profiling figures from scratch, on this machine's class
(the ``cpu`` device profile), and print the JSON the README quotes.

    python -m benchmarks.reproduce_readme                    # writes docs/profiling/cpu/
    python -m benchmarks.reproduce_readme --quick --out /tmp/p

Steps: choose the model (the shipped masked-diffusion model, llada-moe-tasks, or a tiny LLaDA-MoE from make-tiny
when it is absent, which the output says), export it for ONNX Runtime (cached), then
profile it twice on the same fixed canvas, PyTorch eager and ONNX Runtime, each
measurement in its own process: the baseline, the autoregressive baseline, a threshold
sweep with task accuracy and (ONNX Runtime) a sequence-length sweep. Finally the two
reports are put side by side in ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._common import ROOT

DEFAULT_MODEL = ROOT / "dllm_export" / "data" / "llada-moe-tasks"  # README cache table


def choose_model(work: Path) -> tuple[Path, str, dict]:
    """The model, what it is, and sampler overrides (none: the model's own defaults)."""
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL, "the shipped masked-diffusion model (llada-moe-tasks)", {}
    from dllm_export.models.tiny import make_tiny

    tiny = work / "tiny-llada-moe"
    if not (tiny / "config.json").is_file():
        make_tiny("llada-moe", tiny, seed=0, overwrite=True)
    # LLaDA's 128-token default does not fit a 64-token canvas: one block of 32.
    sampler = {"gen_length": 32, "steps": 32, "block_length": 32}
    what = "a tiny random LLaDA-MoE (make-tiny): the default model is not shipped"
    return tiny, what, sampler


def command_line(model: Path, backend: str, args, sweeps, sampler) -> str:
    flags = [
        f"--profile cpu --backend {backend} --threads {args.threads}",
        f"--runs {args.runs} --warmup {args.warmup} --rounds {args.rounds}",
        f"--seq-len {args.seq_len}",
    ]
    if backend == "onnxruntime":
        flags.append(f"--moe {args.moe}")
    flags += [f"--{key.replace('_', '-')} {value}" for key, value in sampler.items()]
    flags += [f"--sweep {sweep}" for sweep in sweeps]
    return f"dllm-export profile {model} " + " ".join(flags)


def run_profile(model: Path, backend: str, args, sweeps, sampler) -> dict:
    from dllm_export.profiling.report import write_report
    from dllm_export.profiling.runner import ProfileOptions, profile_target

    options = ProfileOptions(
        profile="cpu",
        backend=backend,
        sweeps=sweeps,
        sampler=sampler,
        warmup=args.warmup,
        runs=args.runs,
        rounds=args.rounds,
        threads=args.threads,
        seq_len=args.seq_len,
        moe=args.moe,
        quality_examples=args.quality_examples,
        cache_dir=args.work / "cache",
    )

    def report(label, done, total=None):
        if total is None or done == total:
            suffix = "" if total is None else f"/{total}"
            print(f"  {label}: {done}{suffix}", flush=True)

    result = profile_target(model, options, report=report)
    command = command_line(model, backend, args, sweeps, sampler)
    write_report(result, args.out / backend, command=command)
    return result


def preface(results: dict, what: str, args) -> list[str]:
    """What the comparison page says before its table: the run, the machine, the caveats."""
    machine = results["torch"]["machine"]
    loads = [
        r["machine"][k]["load_average_1min"]
        for r in results.values()
        for k in ("load_before", "load_after")
    ]
    return [
        f"Made by `python -m benchmarks.reproduce_readme` with {what}; canvas "
        f"{args.seq_len} tokens, batch 1, {args.runs} timed generations after "
        f"{args.warmup} warm-up ones per point, in {args.rounds} interleaved rounds of "
        "fresh processes (the quietest round is kept).",
        "",
        f"Roofline: the `cpu` device profile ({results['torch']['device_profile']['description']}). "
        f"Measured on {machine['processor']} with {machine['load_before']['cpus']} CPUs "
        f"shared with other jobs (1-minute load {min(loads):.1f} to {max(loads):.1f}), "
        f"{args.threads} thread per backend, each measurement in its own process: compare "
        "medians, and read p90/p99 as the noise of a shared machine.",
        "",
        "No GPU here: the TensorRT and CUDA paths were not run.",
        "",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "profiling" / "cpu")
    parser.add_argument("--work", type=Path, default=Path("out/reproduce"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="1 on a shared machine: idle thread pools spin against others",
    )
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="every point this many times, interleaved; the quietest kept",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=64,
        help="the canvas of both backends (the artifact's fixed length)",
    )
    parser.add_argument(
        "--moe", default="ort", help="MoE strategy of the ONNX artifacts"
    )
    parser.add_argument("--quality-examples", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 runs, no sweeps")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.warmup, args.rounds, args.quality_examples = 2, 1, 1, 5
    model, what, sampler = choose_model(args.work)
    print(f"model: {model} ({what})", flush=True)
    threshold = [] if args.quick else ["threshold=0.5,0.7,0.9"]
    lengths = [] if args.quick else [f"seq_len={args.seq_len},128,256,512"]
    results = {}
    for backend, sweeps in (("torch", threshold), ("onnxruntime", threshold + lengths)):
        print(f"profiling on {backend}", flush=True)
        results[backend] = run_profile(model, backend, args, sweeps, sampler)
    from dllm_export.profiling.report import compare_reports

    compare_reports(
        [args.out / "torch", args.out / "onnxruntime"],
        args.out,
        preface=preface(results, what, args),
    )
    headline = {backend: result["headline"] for backend, result in results.items()}
    print(
        json.dumps(
            {
                "model": str(model),
                "model_note": what,
                "profile": "cpu",
                "threads": args.threads,
                "seq_len": args.seq_len,
                "headline": headline,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
