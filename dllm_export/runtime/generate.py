"""The unmasking loop, shared by every backend.

``denoise`` fills a canvas ``[left-padded prompt | gen_length masks]`` by calling
``backend.predict`` once per step and committing positions with the schedules in
``sampling.py``. Two algorithm families:

* ``llada``: semi-autoregressive blocks, steps split evenly per block, the linear transfer
  schedule, low-confidence or random remasking, optional Fast-dLLM threshold, CFG. Each
  block's predictions come from a cache mode (``cache.py``: none, prefix, dual, block).
* ``dream``: whole-canvas steps with the ``1 - s/t`` schedule and Dream's confidences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.runtime import cache as cache_modes
from dllm_export.runtime import sampling
from dllm_export.runtime.block_decoding import common_origin, llada2_loop
from dllm_export.runtime.prediction import summarize_logits

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
ALGORITHMS = ("llada", "dream", "llada2", "tidar")
ATTENTION = ("bidirectional", "block_causal")


@dataclass
class SamplerConfig:
    """Options of both algorithm families; each family reads its own."""

    algorithm: str = "llada"
    gen_length: int = 128
    steps: int = 128
    block_length: int | None = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    alg: str = "entropy"
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    seed: int = 0
    early_exit: bool = True
    cache: str | None = None  # cache.MODES; None: the family's exact default
    attention: str | None = None  # ATTENTION; None: block_causal for --cache block, else the family's
    # llada2 (block_decoding.py): LLaDA2.0's minimal_topk and eos_early_stop, LLaDA2.1's
    # token editing (None: off), its post-mask editing steps and masks per step
    minimal_topk: int = 1
    eos_early_stop: bool = False
    editing_threshold: float | None = None
    max_post_steps: int = 16
    num_to_transfer: int = 1
    # tidar (tidar.py): the acceptance rule and logit-mix's weight of the draft
    tidar_sampler: str = "lossless"
    mix: float = 0.5
    # a drafting row predicts the next position (a model converted with Dream's
    # convention) or its own (TiDAR); None: the family's
    draft_shift: bool | None = None

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise DllmExportError(
                f"--algorithm {self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        _check_ranges(self)
        if self.cache is not None and self.cache not in cache_modes.MODES:
            raise DllmExportError(
                f"--cache {self.cache!r}: choose one of {', '.join(cache_modes.MODES)}")
        if self.attention is not None and self.attention not in ATTENTION:
            raise DllmExportError(
                f"--attention {self.attention!r}: choose one of {', '.join(ATTENTION)}")
        cached = self.cache not in (None, "none")
        if cached and self.cfg_scale > 0:
            raise DllmExportError(
                f"--cfg-scale with --cache {self.cache}: guidance needs a second, "
                "unconditional canvas per step; use --cache none")
        if self.algorithm == "dream":
            if cached:
                raise DllmExportError(
                    f"--cache {self.cache} decodes block by block: use --algorithm llada "
                    "(with --block-length, and --threshold for Fast-dLLM decoding)")
            if self.alg not in DREAM_ALGS:
                raise DllmExportError(f"--alg {self.alg!r}: choose one of {', '.join(DREAM_ALGS)}")
            return
        if self.algorithm == "tidar":
            from dllm_export.runtime.tidar import SAMPLERS

            if not self.block_length:
                raise DllmExportError("--algorithm tidar drafts blocks: set --block-length")
            if self.tidar_sampler not in SAMPLERS:
                raise DllmExportError(f"--tidar-sampler {self.tidar_sampler!r}: choose one "
                                      f"of {', '.join(SAMPLERS)}")
            return
        if self.algorithm == "llada2":
            if not self.block_length:
                raise DllmExportError("--algorithm llada2 decodes blocks: set --block-length")
            return
        if self.remasking not in ("low_confidence", "random"):
            raise DllmExportError(f"--remasking {self.remasking!r}: low_confidence or random")
        block = self.block_length or self.gen_length
        if self.gen_length % block:
            raise DllmExportError(
                f"--gen-length {self.gen_length} must be a multiple of --block-length {block}"
            )
        if self.threshold is None and self.steps % (self.gen_length // block):
            raise DllmExportError(
                f"--steps {self.steps} must be a multiple of the number of blocks "
                f"({self.gen_length // block} = gen-length / block-length)"
            )

    def updated(self, **overrides) -> "SamplerConfig":
        """These defaults with ``overrides`` (None: keep the default). A default block
        longer than an overridden --gen-length follows it (one block), for LLaDA's loop;
        LLaDA2's blocks are the model's own and an explicit --block-length is kept. A
        default step count above an overridden --gen-length follows it too (LLaDA and
        Dream: one token per step; more steps would run forwards that commit nothing)."""
        known = {f.name for f in fields(self)}
        changes = {k: v for k, v in overrides.items() if k in known and v is not None}
        gen_length = changes.get("gen_length")
        algorithm = changes.get("algorithm", self.algorithm)
        shorter = isinstance(gen_length, int)
        if (algorithm == "llada" and "block_length" not in changes and shorter
                and self.block_length and self.block_length > gen_length):
            changes["block_length"] = gen_length
        if (algorithm in ("llada", "dream") and "steps" not in changes and shorter
                and self.steps > gen_length):
            changes["steps"] = gen_length
        return replace(self, **changes)


# (field, low, low included, high, high included, kind): every sampler option's range.
# Lengths stop at a million tokens: a bigger number is a typo that would allocate the
# canvas or the schedule whole (the fuzz test found --steps 2**40 exhausting memory).
MAX_TOKENS = 1 << 20
RANGES = (
    ("gen_length", 1, True, MAX_TOKENS, True, int), ("steps", 1, True, MAX_TOKENS, True, int),
    ("block_length", 1, True, MAX_TOKENS, True, int), ("threshold", 0, False, 1, True, float),
    ("temperature", 0, True, None, False, float), ("top_p", 0, False, 1, True, float),
    ("top_k", 1, True, None, False, int), ("cfg_scale", 0, True, None, False, float),
    ("alg_temp", 0, True, None, False, float), ("eps", 0, False, 1, False, float),
    ("seed", 0, True, 2**63 - 1, True, int), ("minimal_topk", 1, True, MAX_TOKENS, True, int),
    ("editing_threshold", 0, True, 1, True, float), ("max_post_steps", 0, True, 1024, True, int),
    ("num_to_transfer", 1, True, MAX_TOKENS, True, int), ("mix", 0, True, 1, True, float),
)


def _check_ranges(config) -> None:
    """One line naming the option for a value of the wrong type or out of its range."""
    for name, low, low_in, high, high_in, kind in RANGES:
        value = getattr(config, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or value != value or (kind is int and not float(value).is_integer()):
            raise DllmExportError(f"{flag} {value!r}: must be {'an integer' if kind is int else 'a number'}")
        too_low = value < low or (value == low and not low_in)
        too_high = high is not None and (value > high or (value == high and not high_in))
        if too_low or too_high:
            lower = f"{'>=' if low_in else '>'} {low}"
            upper = f" and {'<=' if high_in else '<'} {high}" if high is not None else ""
            raise DllmExportError(f"{flag} {value}: must be {lower}{upper}")


@dataclass
class StepInfo:
    """What one forward pass did; handed to ``on_step`` callbacks."""

    step: int
    block: int
    canvas: np.ndarray  # [B, L] after this step's commits (do not modify)
    committed: np.ndarray  # [B, L] bool, positions committed in this step
    forward_seconds: float


@dataclass
class DenoiseResult:
    sequences: np.ndarray  # [B, L]
    prompt_length: int  # the canvas index where generation starts
    forwards: int = 0
    step_seconds: list = field(default_factory=list)  # wall time of each step
    forward_seconds: list = field(default_factory=list)  # of which in the backend
    seconds: float = 0.0
    cache: str = "none"  # the cache mode that ran
    attention: str = "bidirectional"  # the attention rule it ran under
    # rows the decode head computed per full-canvas forward of --cache none (the rows
    # graph's); None: every canvas row
    head_rows: int | None = None


@dataclass
class Special:
    mask_id: int
    eos_id: int
    eot_id: int | None
    pad_id: int


def build_canvas(prompts: list[list[int]], gen_length: int, seq_len: int | None,
                 special: Special, truncate: bool = False):
    """Left-pad prompts into ``[B, seq_len]`` and append ``gen_length`` masks.

    Returns (canvas, attention_mask, prompt_length).
    """
    longest = max(len(p) for p in prompts)
    prompt_length = longest if seq_len is None else seq_len - gen_length
    if prompt_length < 1:
        raise DllmExportError(
            f"--gen-length {gen_length} leaves no room for a prompt in the engine's fixed "
            f"length {seq_len}; lower --gen-length"
        )
    if longest > prompt_length:
        if not truncate:
            raise DllmExportError(
                f"prompt has {longest} tokens but the engine fits {prompt_length} "
                f"(seq-len {seq_len} - gen-length {gen_length}); shorten the prompt, lower "
                "--gen-length, re-export with a larger --seq-len, or pass --truncate"
            )
        prompts = [p[-prompt_length:] for p in prompts]
    batch = len(prompts)
    canvas = np.full((batch, prompt_length + gen_length), special.mask_id, dtype=np.int64)
    attention = np.ones_like(canvas)
    for row, prompt in enumerate(prompts):
        pad = prompt_length - len(prompt)
        canvas[row, :pad] = special.pad_id
        attention[row, :pad] = 0
        canvas[row, pad:prompt_length] = prompt
    return canvas, attention, prompt_length


def _canvas_step(backend, attention, config: SamplerConfig, special: Special, canvas,
                 forwards: cache_modes.Forwards):
    """The full-canvas forward's prediction at positions ``start:end`` (the rows graph
    where the artifact has one, else the canvas graph), with classifier-free guidance when
    asked: the prompt positions of the starting canvas are masked in the second row set."""
    prompt_index = canvas != special.mask_id

    def run(current, start, end):
        if config.cfg_scale <= 0:
            return backend.predict_rows(current, attention, start, end - start)
        unconditional = current.copy()
        unconditional[prompt_index] = special.mask_id
        both = backend.logits(np.concatenate([current, unconditional]),
                              np.concatenate([attention, attention]))
        cond, uncond = np.split(both[:, start:end], 2)
        logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
        return summarize_logits(logits, backend.topk, backend.special_ids)

    return lambda current, start, end: forwards(run, current, start, end)


def _finish_rows(canvas, done, prompt_length, special: Special):
    """Early exit: a row is finished once an EOS is committed with everything before it
    committed; the masked positions after it are filled with EOS."""
    generated = canvas[:, prompt_length:]
    for row in np.flatnonzero(~done):
        eos = np.flatnonzero(generated[row] == special.eos_id)
        if eos.size and not (generated[row, : eos[0]] == special.mask_id).any():
            tail = generated[row, eos[0]:]
            tail[tail == special.mask_id] = special.eos_id
            done[row] = True
    return done


def _llada_loop(mode, canvas, prompt_length, config, special, rng, on_step, result):
    """Blocks left to right; each step asks ``mode`` for the block's predictions."""
    block = config.block_length or config.gen_length
    num_blocks = config.gen_length // block
    steps_per_block = config.steps // num_blocks
    done = np.zeros(canvas.shape[0], dtype=bool)
    # Threshold decoding ends a block when it is full; the cap only guards against a model
    # that keeps predicting the mask token (which commits nothing).
    max_steps = 4 * block if config.threshold is not None else steps_per_block
    # LLaDA's generate runs every scheduled step; Fast-dLLM's cached loops stop at a full
    # block (the steps after it would commit nothing).
    stop_when_full = config.threshold is not None or mode.name != "none"
    mode.start(canvas)
    for block_index in range(num_blocks):
        start = prompt_length + block_index * block
        end = start + block
        region = canvas[:, start:end]  # a view: commits write the canvas
        counts = sampling.llada_transfer_counts((region == special.mask_id).sum(axis=1),
                                                steps_per_block)
        for step in range(max_steps):
            if stop_when_full and not (region[~done] == special.mask_id).any():
                break
            step_started = time.perf_counter()
            masked = region == special.mask_id
            pred = mode.predict(canvas, start, end, step)
            x0, confidence = sampling.llada_candidates(
                pred, config.temperature, config.remasking, rng, special.eos_id,
                special.eot_id, config.logits_eos_inf, config.confidence_eos_eot_inf)
            confidence = np.where(masked & ~done[:, None], confidence, sampling.NEG_INF)
            if config.threshold is not None:
                chosen = sampling.select_threshold(confidence, config.threshold)
            else:
                chosen = sampling.select_top(confidence, counts[:, step])
            region[chosen] = x0[chosen]
            if config.early_exit:
                done = _finish_rows(canvas, done, prompt_length, special)
            result.step_seconds.append(time.perf_counter() - step_started)
            if on_step:
                committed = np.zeros(canvas.shape, dtype=bool)
                committed[:, start:end] = chosen
                on_step(StepInfo(len(result.step_seconds), block_index, canvas, committed,
                                 mode.forwards.seconds[-1]))
            if done.all():
                return
        mode.finish_block(canvas, start, end, last=block_index == num_blocks - 1)
        if done.all():
            return


def _dream_loop(mode, canvas, prompt_length, config, special, rng, on_step, result):
    timesteps = sampling.torch_linspace_f32(1.0, config.eps, config.steps + 1)
    length = canvas.shape[1]
    done = np.zeros(canvas.shape[0], dtype=bool)
    batch = canvas.shape[0]
    for step in range(config.steps):
        step_started = time.perf_counter()
        masked = (canvas == special.mask_id) & ~done[:, None]
        pred = mode.predict(canvas, 0, length, step)
        t, s = timesteps[step], timesteps[step + 1]
        last = step == config.steps - 1
        if config.alg == "origin":
            p_transfer = np.float32(1) - s / t if not last else 1.0
            _, x0 = sampling.dream_candidates(pred, "maskgit_plus", config.temperature,
                                              config.top_p, config.top_k, rng)
            chosen = masked & (rng.random(canvas.shape) < p_transfer)
        else:
            confidence, x0 = sampling.dream_candidates(
                pred, config.alg, config.temperature, config.top_p, config.top_k, rng)
            confidence = np.where(masked, confidence, sampling.NEG_INF)
            # The reference averages the mask count over the batch, in float32. Rows that
            # exited early had their masks filled; without early exit they would hold as
            # many as the others (every row commits the same count), so average the rest.
            average = np.float32(masked.sum()) / np.float32((~done).sum())
            count = int(average * (np.float32(1) - s / t)) if not last else int(average)
            counts = np.full(batch, count)
            if config.alg_temp:
                chosen = sampling.sample_positions(confidence, counts, config.alg_temp, rng)
            else:
                chosen = sampling.select_top(confidence, counts)
            chosen &= masked
        canvas[chosen] = x0[chosen]
        if config.early_exit:
            done = _finish_rows(canvas, done, prompt_length, special)
        result.step_seconds.append(time.perf_counter() - step_started)
        if on_step:
            on_step(StepInfo(step + 1, 0, canvas, chosen, mode.forwards.seconds[-1]))
        if done.all():
            return


def resolve_cache(config: SamplerConfig, family) -> tuple[str, str]:
    """The cache mode and attention rule a run uses: the config's, else the family's exact
    default (``block`` for block-causal families); ``block`` implies the block-causal rule."""
    mode = config.cache or (family.default_cache if family is not None else "none")
    if config.attention is not None:
        rule = config.attention
    elif mode == "block":
        rule = "block_causal"
    else:
        rule = family.attention if family is not None else "bidirectional"
    if mode == "block" and rule != "block_causal":
        raise DllmExportError(
            "--cache block is exact only under --attention block_causal; drop --attention")
    return mode, rule


def denoise(backend, prompts: list[list[int]], config: SamplerConfig, special: Special,
            on_step=None, truncate: bool = False, family=None) -> DenoiseResult:
    """Generate for a batch of tokenised prompts; returns the filled canvas and statistics.

    ``family`` (a ``families.Family``) supplies RoPE positions, the logit shift and the
    default cache mode and attention rule; None means a bidirectional, unshifted model.
    """
    canvas, attention, prompt_length = build_canvas(
        prompts, config.gen_length, backend.seq_len, special, truncate)
    if backend.batch_size is not None:
        rows = canvas.shape[0] * (2 if config.cfg_scale > 0 else 1)
        if rows > backend.batch_size:
            raise DllmExportError(
                f"{rows} sequences per step exceed the engine's batch {backend.batch_size}"
                f"{' (CFG doubles the batch)' if config.cfg_scale > 0 else ''}; "
                "re-export with a larger --batch"
            )
    if config.algorithm == "tidar":
        return _tidar(backend, prompts, canvas, attention, prompt_length, config, special,
                      family, on_step)
    mode_name, rule = resolve_cache(config, family)
    rng = np.random.default_rng(config.seed)
    forwards = cache_modes.Forwards()
    origin = common_origin(attention) if config.algorithm == "llada2" else None
    layout = cache_modes.make_layout(
        attention, prompt_length, config.block_length or config.gen_length, rule,
        family or cache_modes.PLAIN, special.pad_id, origin)
    canvas_step = _canvas_step(backend, attention, config, special, canvas, forwards)
    mode = cache_modes.open_mode(mode_name, backend, layout, forwards, canvas_step)
    result = DenoiseResult(sequences=canvas, prompt_length=prompt_length, cache=mode_name,
                           attention=rule)
    if mode_name == "none" and rule == "bidirectional" and config.algorithm == "llada" \
            and config.cfg_scale <= 0:  # what the rows graph computes per forward (profile)
        rows = backend.head_rows(prompt_length, config.block_length or config.gen_length)
        result.head_rows = None if rows is None else len(rows)
    started = time.perf_counter()
    if config.algorithm == "llada2":
        llada2_loop(mode, canvas, layout, config, special, rng, on_step, result)
    else:
        loop = _llada_loop if config.algorithm == "llada" else _dream_loop
        loop(mode, canvas, prompt_length, config, special, rng, on_step, result)
    result.seconds = time.perf_counter() - started
    result.forwards = len(forwards.seconds)
    result.forward_seconds = forwards.seconds
    return result


def _tidar(backend, prompts, canvas, attention, prompt_length, config, special, family,
           on_step) -> DenoiseResult:
    """Draft-and-verify decoding (tidar.py), one sequence at a time: a family with a causal
    mode and a next-token output (``shift_logits``)."""
    from dllm_export.runtime.tidar import tidar_decode

    if family is None or not family.shift_logits:
        name = family.name if family is not None else "this model"
        raise DllmExportError(
            f"--algorithm tidar verifies drafts with next-token predictions, and {name}'s "
            "row p predicts position p (no causal next-token mode); use its own algorithm")
    result = DenoiseResult(sequences=canvas, prompt_length=prompt_length, cache="exact",
                           attention="draft_verify")
    started = time.perf_counter()
    eos = tuple(t for t in (special.eos_id, special.eot_id) if t is not None)
    accepted, steps = [], iter(range(1 << 62))
    for row, prompt in enumerate(prompts):
        def report(first, tokens, seconds, row=row):
            if on_step is None:
                return
            committed = np.zeros(canvas.shape, dtype=bool)
            start = prompt_length + first
            canvas[row, start:start + len(tokens)] = tokens
            committed[row, start:start + len(tokens)] = True
            on_step(StepInfo(next(steps), first // config.block_length, canvas, committed,
                             seconds))

        prompt = canvas[row, :prompt_length][attention[row, :prompt_length] == 1].tolist()
        tokens, stats = tidar_decode(  # the prompt as build_canvas fitted it (--truncate)
            backend, prompt, config.gen_length, config.block_length, special.pad_id,
            eos, config.temperature, config.tidar_sampler, config.mix,
            family.draft_shift if config.draft_shift is None else config.draft_shift,
            special.mask_id, family.positions, config.seed + row, config.early_exit, report,
            config.threshold)
        canvas[row, prompt_length:prompt_length + len(tokens)] = tokens
        canvas[row, prompt_length + len(tokens):] = special.eos_id
        result.forward_seconds += stats.forward_seconds
        accepted += stats.accepted
    result.forwards = len(result.forward_seconds)
    result.step_seconds = list(result.forward_seconds)
    result.accepted = accepted
    result.seconds = time.perf_counter() - started
    return result
