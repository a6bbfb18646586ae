"""Measurement runs: whole diffusion generations and the autoregressive baseline, timed after
warm-up over repeated runs at batch 1.

A run is one prompt (prompts are taken in turn). For diffusion, every step's wall time and
its backend forward time are kept, along with the positions the sampler committed, so that:

* per-step latency = median / p90 / p99 over every step of every timed run;
* time to the first committed block = from the start of the loop until the first
  ``block_length`` answer positions (the whole answer without blocks) hold no mask;
* tokens/s = generated positions (``gen_length``, EOS padding included: what the
  autoregressive baseline is credited with too) / generation time, per run; answer tokens/s
  counts only the answer, up to EOS/EoT;
* TPF = positions committed by the sampler / forwards (the EOS fill of an early exit is not
  counted); NFE = forwards per generation.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from dllm_export import families
from dllm_export.profiling.stats import (
    DeviceMemory,
    host_memory,
    reset_host_peak,
    summarize_ms,
)


def _spread(values: list) -> dict:
    if not values:
        return {}
    return {
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


class _RunRecorder:
    """The ``on_step`` hook of one generation: commit counts and the first-block time."""

    def __init__(self, canvas_start: int, first_block: int, mask_id: int):
        self.start, self.first_block, self.mask_id = canvas_start, first_block, mask_id
        self.committed = 0
        self.first_block_seconds = None
        self.t0 = time.perf_counter()

    def __call__(self, info):
        self.committed += int(info.committed[0].sum())
        if self.first_block_seconds is None:
            block = info.canvas[0, self.start : self.start + self.first_block]
            if not (block == self.mask_id).any():
                self.first_block_seconds = time.perf_counter() - self.t0


def diffusion_run(
    generator, prompt_ids: list[int], config, truncate: bool = True
) -> dict:
    """One timed generation of one prompt; returns its raw numbers."""
    from dllm_export.runtime.generate import build_canvas, denoise

    special = generator.special
    _, _, prompt_length = build_canvas(
        [prompt_ids], config.gen_length, generator.backend.seq_len, special, truncate
    )
    recorder = _RunRecorder(
        prompt_length, config.block_length or config.gen_length, special.mask_id
    )
    recorder.t0 = time.perf_counter()
    result = denoise(
        generator.backend,
        [prompt_ids],
        config,
        special,
        on_step=recorder,
        truncate=truncate,
        family=families.family(generator.family),
    )
    answer = generator.answer_tokens(result.sequences[0, result.prompt_length :])
    return {
        "seconds": result.seconds,
        "forwards": result.forwards,
        "cache": result.cache,
        "attention": result.attention,
        "head_rows": result.head_rows,
        # draft-and-verify counts what each forward decided (block diffusion reports a
        # block to on_step only when it joins the cache)
        "committed": sum(getattr(result, "accepted", None) or []) or recorder.committed,
        "answer_tokens": len(answer),
        "gen_length": config.gen_length,
        "canvas_length": int(result.sequences.shape[1]),
        "prompt_length": int(result.prompt_length),
        "first_block_seconds": recorder.first_block_seconds,
        "step_seconds": list(result.step_seconds),
        "forward_seconds": list(result.forward_seconds),
        "text": generator.tokenizer.decode(answer),
    }


def summarize_diffusion(runs: list[dict]) -> dict:
    steps = [s for run in runs for s in run["step_seconds"]]
    forwards = [s for run in runs for s in run["forward_seconds"]]
    firsts = [run["first_block_seconds"] for run in runs if run["first_block_seconds"]]
    total_forwards = sum(run["forwards"] for run in runs)
    return {
        "runs": len(runs),
        "cache": runs[0]["cache"] if runs else None,
        "attention": runs[0]["attention"] if runs else None,
        "head_rows": runs[0].get("head_rows") if runs else None,
        "step": summarize_ms(steps),
        "forward": summarize_ms(forwards),
        "first_block_ms": _spread([1e3 * s for s in firsts]),
        "generation_ms": _spread([1e3 * run["seconds"] for run in runs]),
        "tokens_per_second": _spread(
            [run["gen_length"] / run["seconds"] for run in runs]
        ),
        "answer_tokens_per_second": _spread(
            [run["answer_tokens"] / run["seconds"] for run in runs]
        ),
        "tokens_per_forward": sum(run["committed"] for run in runs)
        / max(total_forwards, 1),
        "forwards_per_generation": _spread([run["forwards"] for run in runs]),
        "answer_tokens": _spread([run["answer_tokens"] for run in runs]),
        "canvas_length": int(statistics.median(run["canvas_length"] for run in runs)),
        "prompt_length": _spread([run["prompt_length"] for run in runs]),
        "sample_text": runs[0]["text"] if runs else "",
    }


def measure_diffusion(
    generator,
    prompts: list[list[int]],
    config,
    warmup: int,
    runs: int,
    progress=None,
    memory: DeviceMemory | None = None,
) -> dict:
    """Warm up, then time ``runs`` generations (prompts in turn) and summarise them.

    Args:
        generator: a ``runtime.Generator`` over the backend being measured.
        prompts: tokenised prompts.
        config: the ``SamplerConfig`` to generate with.
        warmup, runs: untimed and timed generations.
        progress: ``progress(done, total)`` after each generation.
        memory: a started ``DeviceMemory`` (start it before opening a TensorRT engine);
            None: device memory is reported as not available.
    """
    from dllm_export.profiling.power import PowerSampler

    if memory is None:
        memory = DeviceMemory(generator.backend.name)
        memory.start()
    reset_host_peak()
    for index in range(warmup):
        diffusion_run(generator, prompts[index % len(prompts)], config)
        if progress:
            progress(index + 1, warmup + runs)
    power = PowerSampler().start()
    timed = []
    for index in range(runs):
        timed.append(diffusion_run(generator, prompts[index % len(prompts)], config))
        memory.sample()
        if progress:
            progress(warmup + index + 1, warmup + runs)
    summary = summarize_diffusion(timed)
    summary.update(host_memory())
    summary.update(memory.as_dict())
    summary.update(power.stop())
    return summary


def measure_autoregressive(
    decoder,
    prompts: list[list[int]],
    new_tokens: int,
    warmup: int,
    runs: int,
    progress=None,
) -> dict:
    """Greedy decoding of ``new_tokens`` tokens per run (no early stop), timed the same way.

    tokens/s counts the prefill: new tokens / (prefill + decode time); decode tokens/s
    leaves the prefill out.
    """
    from dllm_export.profiling.power import PowerSampler

    reset_host_peak()
    for index in range(warmup):
        decoder.decode(prompts[index % len(prompts)], new_tokens)
        if progress:
            progress(index + 1, warmup + runs)
    power = PowerSampler().start()
    records = []
    for index in range(runs):
        records.append(decoder.decode(prompts[index % len(prompts)], new_tokens))
        if progress:
            progress(warmup + index + 1, warmup + runs)
    tokens = [t for r in records for t in r.token_seconds]
    summary = {
        "runs": runs,
        "new_tokens": new_tokens,
        "token": summarize_ms(tokens),
        "prefill_ms": _spread([1e3 * r.prefill_seconds for r in records]),
        "tokens_per_second": _spread(
            [new_tokens / (r.prefill_seconds + sum(r.token_seconds)) for r in records]
        ),
        "decode_tokens_per_second": _spread(
            [new_tokens / sum(r.token_seconds) for r in records]
        ),
        "prompt_length": _spread([len(p) for p in prompts]),
        "context_mean": float(np.mean([len(p) for p in prompts]) + new_tokens / 2),
    }
    summary.update(host_memory())
    summary.update(power.stop())
    return summary
