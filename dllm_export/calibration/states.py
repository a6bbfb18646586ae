"""Denoiser inputs for calibration: the canvases the engine will really meet.

Two kinds, each a named generator yielding ``CanvasState``:

* ``forward_process_states``: a prompt and its clean response, with the response masked at
  stratified ratios across (0, 1) (the training forward process, one ratio per state);
* ``trajectory_states``: the float artifact's own unmasking loop run on the prompts, with
  the input of every step recorded (``denoise``'s ``on_step``), so the states carry the
  committed-token patterns decoding produces, not uniform random masks.

``calibration_states`` mixes them (``mode``: "mixed", "forward", "trajectory"). All states
have the artifact's fixed length and hold one sequence each; ``batched`` groups them into
the artifact's fixed batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator

import numpy as np

from dllm_export.calibration.clock import ForwardClock
from dllm_export.errors import DllmExportError
from dllm_export.runtime.generate import SamplerConfig, Special, build_canvas, denoise

MODES = ("mixed", "forward", "trajectory")
# Forward-process states per prompt, at as many ratios. (8, reusing the trajectories'
# prompts and answers, halves the generations but dropped a sound INT8 run below the gate's
# bar on a random tiny model: the ranges want more prompts.)
FORWARD_PER_PROMPT = 4
TRAJECTORY_PER_PROMPT = 8


@dataclass
class CanvasState:
    """One denoiser input of the artifact's length (one row)."""

    input_ids: np.ndarray  # [L] int64
    attention_mask: np.ndarray  # [L] int64
    mask_ratio: float  # masked share of the response region
    origin: str  # "forward" or "trajectory"


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[int] | None


def tokenize(
    texts: Iterable, tokenizer, special: Special
) -> Iterator[TokenizedExample]:
    """Token ids of ``CalibrationText`` items; responses end with EOS as in training."""
    for item in texts:
        prompt = tokenizer.format_prompt(item.prompt, item.chat)
        response = None
        if item.response is not None:
            response = tokenizer.encode(item.response) + [special.eos_id]
        if prompt:
            yield TokenizedExample(prompt, response)


def _response_canvas(
    example: TokenizedExample, gen_length: int, seq_len: int, special: Special
):
    """[prompt | response padded with EOS] at the fixed length, and the response slice."""
    canvas, attention, start = build_canvas(
        [example.prompt_ids], gen_length, seq_len, special, truncate=True
    )
    response = (example.response_ids or [])[:gen_length]
    canvas[0, start : start + len(response)] = response
    canvas[0, start + len(response) :] = special.eos_id
    return canvas[0], attention[0], start


def forward_process_states(
    examples: list[TokenizedExample],
    count: int,
    gen_length: int,
    seq_len: int,
    special: Special,
    seed: int = 0,
) -> Iterator[CanvasState]:
    """``count`` states; state ``i`` masks each response token with probability
    ``t_i = (i + u) / count`` (stratified over (0, 1)), cycling through the examples."""
    if not examples:
        return
    rng = np.random.default_rng([seed, 1])
    ratios = (np.arange(count) + rng.uniform(0.05, 0.95, count)) / count
    rng.shuffle(ratios)
    for index, ratio in enumerate(ratios):
        ids, attention, start = _response_canvas(
            examples[index % len(examples)], gen_length, seq_len, special
        )
        masked = rng.random(gen_length) < ratio
        if not masked.any():  # every state has something to predict
            masked[rng.integers(gen_length)] = True
        ids = ids.copy()
        ids[start:][masked] = special.mask_id
        yield CanvasState(ids, attention, float(masked.mean()), "forward")


def trajectory_states(
    backend,
    examples: list[TokenizedExample],
    count: int,
    config: SamplerConfig,
    special: Special,
    per_prompt: int = TRAJECTORY_PER_PROMPT,
    completed: list | None = None,
    clock=None,
    family=None,
) -> Iterator[CanvasState]:
    """Run the float backend's unmasking loop on the prompts, record the input of every
    step, and yield ``per_prompt`` of them per prompt (evenly spaced from the first, fully
    masked step to the last), until ``count`` states. Each finished answer is appended to
    ``completed``. ``clock`` (a ``ForwardClock``) is ticked once per forward."""
    made = 0
    prompts = min(len(examples), -(-count // per_prompt))  # the ones this will decode
    for number, example in enumerate(examples, start=1):
        steps: list[np.ndarray] = []
        canvas, attention, start = build_canvas(
            [example.prompt_ids],
            config.gen_length,
            backend.seq_len,
            special,
            truncate=True,
        )
        steps.append(canvas[0].copy())  # the first input: the whole response masked

        def record(info, steps=steps, start=start, number=number):
            if clock:
                clock.tick(f"trajectory {number}/{prompts}")
            # Still masked: this canvas is the input of a later step.
            if (info.canvas[0, start:] == special.mask_id).any():
                steps.append(info.canvas[0].copy())

        result = denoise(
            backend,
            [example.prompt_ids],
            config,
            special,
            on_step=record,
            truncate=True,
            family=family,
        )
        if clock:
            clock.skip(config.steps - result.forwards)
        if completed is not None:
            answer = [int(t) for t in result.sequences[0, start:]]
            completed.append(TokenizedExample(example.prompt_ids, answer))
        picks = np.unique(
            np.linspace(0, len(steps) - 1, min(per_prompt, len(steps)))
            .round()
            .astype(int)
        )
        for index in picks:
            ids = steps[index]
            ratio = float((ids[start:] == special.mask_id).mean())
            yield CanvasState(ids, attention[0], ratio, "trajectory")
            made += 1
            if made >= count:
                return


def complete_responses(
    backend, examples: list[TokenizedExample], config: SamplerConfig, special: Special,
    clock=None, family=None,
) -> list[TokenizedExample]:
    """Examples without a response get the float model's own answer (temperature 0)."""
    out = []
    missing = sum(e.response_ids is None for e in examples)
    answered = 0
    for example in examples:
        if example.response_ids is None:
            answered += 1

            def tick(info, answered=answered):
                if clock:
                    clock.tick(f"answer {answered}/{missing}")

            result = denoise(
                backend, [example.prompt_ids], config, special, on_step=tick, truncate=True,
                family=family,
            )
            if clock:
                clock.skip(config.steps - result.forwards)
            start = result.prompt_length
            example = TokenizedExample(
                example.prompt_ids, [int(t) for t in result.sequences[0, start:]]
            )
        out.append(example)
    return out


def calibration_states(
    backend,
    texts: Iterable,
    tokenizer,
    config: SamplerConfig,
    special: Special,
    samples: int,
    mode: str = "mixed",
    seed: int = 0,
    progress=None,
    family=None,
) -> list[CanvasState]:
    """``samples`` denoiser inputs from calibration texts.

    Args:
        backend: the float artifact (an ``OrtBackend``), used for trajectories and for
            writing missing responses.
        texts: ``CalibrationText`` items (``sources.open_source``).
        tokenizer: the artifact's ``TextTokenizer``.
        config: the sampler the trajectories follow (the artifact's generation defaults).
        special: special token ids.
        family: the artifact's ``families.Family`` (its positions, shift and own sampler).
        samples: how many states in all.
        mode: "mixed" (half each), "forward" or "trajectory".
        progress: ``progress(stage, detail)`` gets each generation forward and an estimate.
    Returns:
        A list of ``CanvasState``; raises DllmExportError when the data yields none.
    """
    if mode not in MODES:
        raise DllmExportError(
            f"--calib-mode {mode!r}: choose one of {', '.join(MODES)}"
        )
    if samples < 1:
        raise DllmExportError("--samples must be at least 1")
    trajectory_count = {"mixed": samples // 2, "forward": 0, "trajectory": samples}[
        mode
    ]
    forward_count = samples - trajectory_count
    # A trajectory yields up to `steps` states per prompt; spread them over several prompts.
    per_prompt = max(1, min(config.steps, TRAJECTORY_PER_PROMPT))
    # Each prompt gives up to 8 trajectory states and 4 forward-process states (at 4
    # different ratios): prompts without a response cost a full generation each.
    needed = max(
        -(-forward_count // FORWARD_PER_PROMPT), -(-trajectory_count // per_prompt), 1
    )
    examples = list(islice(tokenize(texts, tokenizer, special), needed))
    if not examples:
        raise DllmExportError(
            "calibration data is empty: the source yielded no text; pass --calib with a "
            "non-empty .txt or .jsonl file"
        )
    clock = ForwardClock(
        _planned_generations(examples, trajectory_count, per_prompt) * config.steps,
        progress)
    states: list[CanvasState] = []
    if trajectory_count:
        answered: list[TokenizedExample] = []
        states += trajectory_states(
            backend,
            examples,
            trajectory_count,
            config,
            special,
            per_prompt,
            completed=answered,
            clock=clock,
            family=family,
        )
        by_prompt = {tuple(e.prompt_ids): e for e in answered}
        examples = [
            e if e.response_ids is not None else by_prompt.get(tuple(e.prompt_ids), e)
            for e in examples
        ]
    # A short data set tops up with forward-process states.
    forward_count = samples - len(states)
    if forward_count:
        examples = complete_responses(backend, examples, config, special, clock, family)
        states += forward_process_states(
            examples, forward_count, config.gen_length, backend.seq_len, special, seed
        )
    return states


def _planned_generations(examples: list[TokenizedExample], trajectory_count: int,
                         per_prompt: int) -> int:
    """Generations calibration will run: one per trajectory prompt, and one per other
    prompt that has no response (the forward-process states need its answer)."""
    trajectories = min(len(examples), -(-trajectory_count // per_prompt))
    return trajectories + sum(e.response_ids is None for e in examples[trajectories:])


def batched(
    states: list[CanvasState], batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(input_ids [batch, L], attention_mask [batch, L]); the last batch repeats its first
    row to fill the artifact's fixed batch."""
    for start in range(0, len(states), batch):
        chunk = states[start : start + batch]
        chunk = chunk + [chunk[0]] * (batch - len(chunk))
        yield (
            np.stack([s.input_ids for s in chunk]).astype(np.int64),
            np.stack([s.attention_mask for s in chunk]).astype(np.int64),
        )
