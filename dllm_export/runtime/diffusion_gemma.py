"""DiffusionGemma's block-diffusion sampler over numpy, as transformers'
``DiffusionGemmaGenerationMixin.generate`` with its ``EntropyBoundSampler``,
``LinearTemperatureScheduleLogitsProcessor`` and ``StableAndConfidentStoppingCriteria``.

Per canvas of ``canvas_length`` tokens: the encoder writes the not yet cached tokens (the
prompt, later the last committed canvas) into the cache; the canvas starts as uniform
random tokens (no mask token); then for step n = N .. 1 (N = ``max_denoising_steps``):

1. the decoder runs over the canvas and the cache with the previous step's self-conditioning
   signal (none at the first step); its logits are divided by the temperature
   t = t_min + (t_max - t_min) n / N;
2. a token is sampled per position from softmax(logits / t) (inverse CDF: the first token
   whose cumulative probability reaches a uniform draw), and the argmax and the entropy
   are kept;
3. entropy-bound acceptance: the positions sorted by entropy, ascending, are accepted while
   (cumulative entropy - the position's own) <= ``entropy_bound``; accepted positions take
   the sample, the others keep the current token and are then re-noised with fresh uniform
   tokens;
4. a row stops when its argmax canvas equals the last ``stability_threshold`` ones and its
   mean entropy is below ``confidence_threshold``; a stopped row keeps its canvas, argmax
   and signal. The scaled logits are the next step's self-conditioning signal.

The argmax canvas is appended (not the sampled one); a row that produced an end-of-sequence
token is finished: tokens after its first one, and later canvases, become padding. The next
canvas's encoder pass over the appended tokens is the commit pass.

The model is reached through ``Steps`` (``encode`` and ``denoise``), so that nothing here
needs the logits: ``denoise`` returns per position the sample, argmax and entropy and an
opaque signal for the next step (an exported decoder graph keeps it on the device as soft
embeddings). Randomness comes from a ``Noise`` (uniform tokens, and one uniform per
position for the sample, drawn in transformers' order: the canvas, then per step the sample
and the re-noising), so that a test can give the same noise to this sampler and to
transformers' and compare tokens (export/diffusion_gemma.py says why the host draws it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import takewhile
from pathlib import Path
from typing import Protocol

import numpy as np

from dllm_export.errors import DllmExportError


@dataclass
class GemmaSamplerConfig:
    """transformers' ``DiffusionGemmaGenerationConfig`` defaults."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.max_denoising_steps < 1:
            raise DllmExportError("--max-new-tokens and --max-denoising-steps must be at least 1")
        if not (0 < self.t_min and 0 < self.t_max):
            raise DllmExportError("--t-min and --t-max must be above 0")
        if self.entropy_bound <= 0:
            raise DllmExportError(f"--entropy-bound {self.entropy_bound}: must be above 0")
        if self.stability_threshold < 0:
            raise DllmExportError("--stability-threshold must be at least 0")

    def temperature(self, step: int) -> float:
        return self.t_min + (self.t_max - self.t_min) * (step / self.max_denoising_steps)


def gemma_defaults(generation_config: dict) -> dict:
    """The sampler fields a checkpoint's generation_config.json sets (transformers' names),
    over transformers' defaults."""
    from dataclasses import asdict

    fields = asdict(GemmaSamplerConfig())
    return {**fields, **{k: v for k, v in generation_config.items() if k in fields}}


class Noise(Protocol):
    def tokens(self, shape: tuple) -> np.ndarray: ...  # uniform ids in [0, vocab)

    def uniform(self, shape: tuple) -> np.ndarray: ...  # float32 in [0, 1)


class NumpyNoise:
    """Seeded noise: uniform tokens and uniform floats in [0, 1)."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)

    def tokens(self, shape):
        return self.rng.integers(0, self.vocab_size, size=shape, dtype=np.int64)

    def uniform(self, shape):
        return self.rng.random(size=shape, dtype=np.float32)


class Steps(Protocol):
    vocab_size: int
    canvas_length: int

    def reset(self, batch: int) -> None: ...

    def encode(self, ids: np.ndarray, start: int) -> None:
        """Write the keys and values of ``ids`` [B, L] at positions start.. (causal)."""

    def denoise(self, canvas: np.ndarray, start: int, temperature: float, signal,
                uniform: np.ndarray):
        """One decoder step: (sample, argmax [B, L] int64, entropy [B, L] float32, the
        next step's signal)."""


def accept(entropy: np.ndarray, bound: float) -> np.ndarray:
    """The entropy-bound acceptance mask [B, L]."""
    order = np.argsort(entropy, axis=-1, kind="stable")
    ordered = np.take_along_axis(entropy, order, axis=-1)
    keep = (np.cumsum(ordered, axis=-1) - ordered) <= bound
    mask = np.zeros_like(keep)
    np.put_along_axis(mask, order, keep, axis=-1)
    return mask


@dataclass
class GemmaResult:
    sequences: np.ndarray  # [B, prompt + canvases x canvas_length]
    prompt_length: int
    forwards: np.ndarray  # decoder passes per row
    steps_per_canvas: list


def generate(steps: Steps, prompt: np.ndarray, config: GemmaSamplerConfig, noise: Noise,
             eos_ids=(), pad_id: int | None = None) -> GemmaResult:
    """Block diffusion from ``prompt`` [B, P] (no padding) as transformers' ``generate``."""
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise DllmExportError("prompt: give a [batch, length] array of at least one token")
    batch, length = prompt.shape
    canvas_length = steps.canvas_length
    canvases = -(-config.max_new_tokens // canvas_length)
    max_length = length + config.max_new_tokens
    eos = np.asarray(list(eos_ids), dtype=np.int64)
    ids = prompt.copy()
    finished = np.zeros(batch, dtype=bool)
    forwards = np.zeros(batch, dtype=np.int64)
    per_canvas = []
    steps.reset(batch)
    pending, start = ids, 0
    for _ in range(canvases):
        steps.encode(pending, start)  # prefill, then the commit pass of the last canvas
        start += pending.shape[1]
        canvas = noise.tokens((batch, canvas_length))
        argmax = canvas
        signal = None
        done = np.zeros(batch, dtype=bool)
        history = np.full((config.stability_threshold, batch, canvas_length), -1, np.int64)
        taken = 0
        for step in range(config.max_denoising_steps, 0, -1):
            forwards += ~(done | finished)
            taken += 1
            uniform = noise.uniform((batch, canvas_length))
            sample, new_argmax, entropy, new_signal = steps.denoise(
                canvas, start, config.temperature(step), signal, uniform)
            accepted = accept(entropy, config.entropy_bound)
            new_canvas = np.where(accepted, sample, canvas)
            fresh = noise.tokens((batch, canvas_length))
            new_canvas = np.where(accepted, new_canvas, fresh)
            if done.any():
                new_argmax = np.where(done[:, None], argmax, new_argmax)
                new_canvas = np.where(done[:, None], canvas, new_canvas)
                new_signal = steps.keep(done, signal, new_signal)
            if config.stability_threshold == 0:
                stable = np.ones(batch, dtype=bool)
            else:
                stable = (history == new_argmax[None]).all(axis=-1).all(axis=0)
                history = np.roll(history, -1, axis=0)
                history[-1] = new_argmax
            confident = entropy.mean(axis=-1) < config.confidence_threshold
            # a row that stopped earlier stays stopped, whatever its statistics say now
            done |= stable & confident
            canvas, argmax, signal = new_canvas, new_argmax, new_signal
            if done.all():
                break
        per_canvas.append(taken)
        ids = np.concatenate((ids, argmax), axis=1)
        new = ids[:, -canvas_length:]
        this = np.isin(new, eos).any(axis=1) if eos.size else np.zeros(batch, dtype=bool)
        this |= ids.shape[1] >= max_length
        before = finished
        finished = before | this
        if pad_id is not None and finished.any():
            new[before] = pad_id
            if eos.size and this.any():
                is_eos = np.isin(new, eos)
                count = np.cumsum(is_eos, axis=1)
                new[(count > 0) & ~((count == 1) & is_eos)] = pad_id
        if finished.all():
            break
        pending = ids[:, -canvas_length:]
    return GemmaResult(ids, length, forwards, per_canvas)


def inverse_cdf(torch, probs, uniform):
    """The first token whose cumulative probability exceeds ``uniform`` (as the decoder
    graph computes it)."""
    below = (torch.cumsum(probs, dim=-1) < uniform[..., None]).to(torch.int64)
    return torch.minimum(below.sum(dim=-1), torch.tensor(probs.shape[-1] - 1))


class TorchSteps:
    """``Steps`` over the PyTorch model (models/diffusion_gemma.py) in eager mode, with the
    cache held as the model's per-layer keys and values. The reference the exported graphs
    are checked against; the signal is the scaled logits (soft embeddings are made from
    them by the model)."""

    def __init__(self, model):
        import torch

        self.torch = torch
        self.model = model
        self.vocab_size = model.args.vocab_size
        self.canvas_length = model.args.canvas_length
        self.past = None

    def reset(self, batch: int) -> None:
        self.past = None

    def _past_length(self) -> int:
        return 0 if self.past is None else self.past[0][0].shape[2]

    def encode(self, ids, start):
        from dllm_export.models.layers import KVCache

        torch = self.torch
        ids = torch.as_tensor(ids)
        batch, length = ids.shape
        past = self._past_length()
        own = torch.tril(torch.ones(length, length, dtype=torch.bool))
        visible = torch.cat((torch.ones(length, past, dtype=torch.bool), own), dim=1)
        positions = torch.arange(start, start + length)[None].expand(batch, -1)
        cache = KVCache(self.past)
        with torch.no_grad():
            self.model.encode(ids, positions, visible[None].expand(batch, -1, -1), cache)
        if self.past is None:
            self.past = cache.presents
        else:
            self.past = [tuple(torch.cat((old, new), dim=2) for old, new in zip(a, b, strict=True))
                         for a, b in zip(self.past, cache.presents, strict=True)]

    def denoise(self, canvas, start, temperature, signal, uniform):
        from dllm_export.models.layers import KVCache

        torch = self.torch
        canvas = torch.as_tensor(canvas)
        batch, length = canvas.shape
        past = self._past_length()
        positions = torch.arange(start, start + length)[None].expand(batch, -1)
        visible = torch.ones(batch, length, past + length, dtype=torch.bool)
        with torch.no_grad():
            logits = self.model.denoise(canvas, positions, visible, KVCache(self.past),
                                        previous_logits=signal)
            scaled = logits / temperature
            logprobs = torch.log_softmax(scaled, dim=-1)
            entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
            sample = inverse_cdf(torch, logprobs.exp(), torch.as_tensor(uniform))
            argmax = torch.argmax(scaled, dim=-1)
        return sample.numpy(), argmax.numpy(), entropy.float().numpy(), scaled

    def keep(self, done, old, new):
        """The signal of rows that stopped stays theirs."""
        if old is None:
            return new
        rows = self.torch.as_tensor(done)[:, None, None]
        return self.torch.where(rows, old, new)


class OnnxSteps:
    """``Steps`` over the three graphs of an exported artifact (export/diffusion_gemma.py)
    on ONNX Runtime, with the cache held here as one numpy (keys, values) pair per layer of
    ``capacity`` slots; the signal is the soft embeddings the decoder graph returns."""

    def __init__(self, artifact_dir, threads: int | None = None, providers=None,
                 manifest: dict | None = None):
        import onnxruntime as ort

        from dllm_export.jsonio import read_json

        self.directory = Path(artifact_dir)
        if manifest is None:
            manifest = read_json(self.directory / "manifest.json", "the artifact manifest")
        if manifest.get("family") != "diffusion-gemma":
            raise DllmExportError(f"{self.directory}: not a diffusion-gemma artifact")
        self.manifest = manifest
        self.vocab_size = manifest["vocab_size"]
        self.canvas_length = manifest["canvas_length"]
        self.capacity = manifest["capacity"]
        self.prompt_length = manifest["prompt_length"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # a Q/DQ graph's unused initialisers are no news
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {
            name: ort.InferenceSession(str(self.directory / graph["file"]), options,
                                       providers=providers or ["CPUExecutionProvider"])
            for name, graph in manifest["graphs"].items()}
        self.batch = manifest["batch"]
        self.cache = None

    def reset(self, batch: int) -> None:
        if batch != self.batch:
            raise DllmExportError(f"batch {batch}: the artifact was exported for batch "
                                  f"{self.batch} (export with --batch {batch})")
        self.cache = [np.zeros((batch, layer["kv_heads"], self.capacity, layer["head_dim"]),
                               np.float32)
                      for layer in self.manifest["cache"] for _ in range(2)]

    def _feeds(self, ids, start, own, extra=()):
        batch, rows = ids.shape
        visible = np.zeros((batch, rows, self.capacity + rows), dtype=bool)
        visible[:, :, :start] = True
        visible[:, :, self.capacity:] = own
        positions = np.broadcast_to(np.arange(start, start + rows), (batch, rows))
        feeds = {"input_ids": ids.astype(np.int64), "position_ids": positions.astype(np.int64),
                 "attention_mask": visible, **dict(extra)}
        layers = len(self.cache) // 2
        for i in range(layers):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = self.cache[2 * i:2 * i + 2]
        return feeds

    def encode(self, ids, start):
        ids = np.asarray(ids, dtype=np.int64)
        batch, real = ids.shape
        graph = "prefill" if start == 0 else "commit"
        rows = self.prompt_length if graph == "prefill" else self.canvas_length
        if real > rows:
            raise DllmExportError(f"prompt of {real} tokens: the artifact takes up to {rows} "
                                  f"(export with --seq-len {real + self.canvas_length} or more)")
        if start + real > self.capacity:
            raise DllmExportError(f"the cache is full at {start + real} tokens: the artifact "
                                  f"holds {self.capacity} (export with a larger --seq-len)")
        padded = np.zeros((batch, rows), dtype=np.int64)
        padded[:, :real] = ids  # right padding: causal rows never see it, and it is not kept
        own = np.tril(np.ones((rows, rows), dtype=bool))
        presents = self.run(graph, self._feeds(padded, start, own))
        for state, new in zip(self.cache, presents, strict=True):
            state[:, :, start:start + real] = new[:, :, :real]

    def denoise(self, canvas, start, temperature, signal, uniform):
        batch, rows = canvas.shape
        if start + rows > self.capacity:
            raise DllmExportError(f"the canvas at {start} does not fit the cache of "
                                  f"{self.capacity} slots (export with a larger --seq-len)")
        if signal is None:
            signal = np.zeros((batch, rows, self.manifest["hidden_size"]), np.float32)
        extra = {"signal": signal, "temperature": np.array([temperature], np.float32),
                 "uniform": np.asarray(uniform, np.float32)}
        own = np.ones((rows, rows), dtype=bool)
        sample, argmax, entropy, nxt = self.run(
            "decoder", self._feeds(np.asarray(canvas), start, own, extra))
        return sample, argmax, entropy, nxt

    def run(self, graph: str, feeds: dict) -> list:
        """One graph on its feeds (calibration records them here)."""
        return self.sessions[graph].run(None, feeds)

    def keep(self, done, old, new):
        return new if old is None else np.where(np.asarray(done)[:, None, None], old, new)


# dllm-export's generic sampler options, as DiffusionGemma's sampler names them
OPTION_NAMES = {"gen_length": "max_new_tokens", "steps": "max_denoising_steps"}


class GemmaGenerator:
    """Prompt in, text out over an exported DiffusionGemma artifact on ONNX Runtime: what
    ``runtime.Generator.from_artifact`` returns for this family (its sampler is not the
    masked-diffusion loop). Prompts run one canvas batch at a time: with an artifact of
    batch 1 any prompts, one after another; with batch B exactly B prompts of one length
    (left-padded batches are not supported yet)."""

    def __init__(self, steps: OnnxSteps, tokenizer, manifest: dict):
        self.steps, self.tokenizer, self.manifest = steps, tokenizer, manifest
        self.family = "diffusion-gemma"
        self.defaults = GemmaSamplerConfig(**manifest["generation_defaults"])
        special = manifest["special_tokens"]
        self.eos_ids, self.pad_id = tuple(special["eos_ids"]), special["pad_id"]

    @classmethod
    def from_artifact(cls, artifact_dir, provider: str = "cpu", threads: int | None = None):
        from dllm_export.runtime.tokenizer import TextTokenizer

        if provider != "cpu":
            raise DllmExportError(f"--provider {provider}: DiffusionGemma artifacts run on "
                                  "ONNX Runtime's CPU provider for now")
        steps = OnnxSteps(artifact_dir, threads=threads)
        for key in ("generation_defaults", "special_tokens"):
            if key not in steps.manifest:
                raise DllmExportError(f"{Path(artifact_dir) / 'manifest.json'}: no {key} "
                                      "(exported before run supported DiffusionGemma: "
                                      "re-export it)")
        return cls(steps, TextTokenizer(artifact_dir), steps.manifest)

    def config(self, **overrides) -> GemmaSamplerConfig:
        from dataclasses import asdict, fields

        names = {f.name for f in fields(GemmaSamplerConfig)}
        values = asdict(self.defaults)
        for key, value in overrides.items():
            name = OPTION_NAMES.get(key, key)
            if name not in names:
                raise DllmExportError(
                    f"--{key.replace('_', '-')}: not an option of DiffusionGemma's sampler "
                    f"(it takes --gen-length, --steps and --seed)")
            values[name] = value
        return GemmaSamplerConfig(**values)

    def generate(self, prompts, chat: bool = False, on_text=None, on_step=None,
                 truncate: bool = False, seed: int = 0, **overrides):
        """Like ``runtime.Generator.generate``; ``seed`` seeds the sampler's noise."""
        import time

        from dllm_export.runtime.api import GenerationOutput

        if on_step is not None:
            raise DllmExportError("--show-steps: not available for DiffusionGemma yet")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        config = self.config(**overrides)
        ids = [self.tokenizer.format_prompt(p, chat) for p in prompts]
        limit = self.steps.prompt_length
        if truncate:
            ids = [row[-limit:] for row in ids]
        batch = self.steps.batch
        if batch == 1:
            groups = [[row] for row in ids]
        elif len(ids) == batch and len({len(row) for row in ids}) == 1:
            groups = [ids]
        else:
            raise DllmExportError(
                f"{len(ids)} prompts: this artifact decodes exactly {batch} prompts of one "
                "length at a time (left-padded batches are not supported yet); export with "
                "--batch 1 to decode any prompts one after another")
        canvas = self.steps.canvas_length
        fits = (self.steps.capacity - max(len(row) for row in ids)) // canvas * canvas
        if config.max_new_tokens > fits:
            if "gen_length" in overrides or "max_new_tokens" in overrides:
                raise DllmExportError(
                    f"--gen-length {config.max_new_tokens}: the cache of "
                    f"{self.steps.capacity} slots holds {fits} new tokens after this prompt "
                    "(export with a larger --seq-len)")
            config = replace(config, max_new_tokens=fits)  # the default, to what fits
        noise = NumpyNoise(self.steps.vocab_size, seed)
        rows, forwards, started = [], 0, time.perf_counter()
        for group in groups:
            result = generate(self.steps, np.asarray(group), config, noise, self.eos_ids,
                              self.pad_id)
            forwards += int(result.forwards.max())
            rows += [list(takewhile(lambda t: t not in self.eos_ids, row))
                     for row in result.sequences[:, result.prompt_length:].tolist()]
        seconds = time.perf_counter() - started
        texts = [self.tokenizer.decode(r) for r in rows]
        if on_text is not None:
            on_text(texts[0])
        per_forward = 1000 * seconds / max(forwards, 1)  # the mean: steps are not timed alone
        return GenerationOutput(texts=texts, tokens=rows, forwards=forwards,
                                generated_tokens=sum(len(r) for r in rows), seconds=seconds,
                                step_ms_median=per_forward, forward_ms_median=per_forward)
