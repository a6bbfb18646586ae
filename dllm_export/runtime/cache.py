"""Cache modes: which forward the unmasking loop runs for a block, and what it caches.

The loop (``generate.py``) asks a mode for the prediction of the block it is filling;
the mode decides what the backend computes. The cache itself lives in the backend
(``Backend.prefill`` writes it, ``Backend.cached_step`` reads it and writes where told);
here is only its bookkeeping: which slots hold usable keys. Slot ``j`` holds canvas
position ``j``. Modes:

* ``none``: every step is a full-canvas forward (the canvas graph, or the prefill graph
  when the rule is not bidirectional).
* ``prefix`` (Fast-dLLM ``generate_with_prefix_cache``): at a block's first step a full
  forward writes the cache and makes the first commit; later steps feed the block and the
  masked suffix and attend to the cached prefix. Approximate for a bidirectional model.
* ``dual`` (Fast-dLLM ``generate_with_dual_cache``): the same full forward; later steps feed
  the block alone and attend to the cached prefix and suffix. Approximate.
* ``block``: the exact cache of a block-causal model: the prompt is prefilled, each block is
  denoised against the cache, and its keys and values are written once with its final
  tokens (one commit forward, as dInfer and vLLM's DiffusionGemma do).

Families whose row ``p`` predicts ``p + 1`` (Dream) feed windows one position early.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.runtime.attention import (
    block_ids,
    cached_mask,
    canvas_mask,
    rope_positions,
)

MODES = ("none", "prefix", "dual", "block")


@dataclass(frozen=True)
class Rules:
    """How the runtime drives a family (``families.Family`` has the same fields)."""

    positions: str = "absolute"
    shift_logits: bool = False
    attention: str = "bidirectional"


PLAIN = Rules()  # a bidirectional, unshifted model with absolute positions


@dataclass
class Layout:
    """The fixed facts of one generation that every forward needs."""

    real: np.ndarray  # [B, L] bool: False on left padding
    positions: np.ndarray  # [B, L] RoPE positions
    prompt_length: int
    block_length: int
    rule: str  # attention rule of this run
    shift: int  # 1 when row p predicts p + 1
    pad_id: int
    origin: int | None = None  # absolute block alignment from this canvas index (LLaDA2)
    blocks: np.ndarray = field(init=False)
    first_block: int = field(init=False)  # where the first generation block starts

    def __post_init__(self):
        self.blocks = block_ids(self.real.shape[1], self.prompt_length, self.block_length,
                                self.origin)
        if self.origin is None:
            self.first_block = self.prompt_length
        else:
            real = self.prompt_length - self.origin
            self.first_block = self.origin + real // self.block_length * self.block_length


def make_layout(attention: np.ndarray, prompt_length: int, block_length: int, rule: str,
                family_rules, pad_id: int, origin: int | None = None) -> Layout:
    real = attention.astype(bool)
    return Layout(real, rope_positions(real, family_rules.positions), prompt_length,
                  block_length, rule, int(family_rules.shift_logits), pad_id, origin)


class Forwards:
    """Times every backend call (``seconds``) for the result's statistics."""

    def __init__(self):
        self.seconds: list[float] = []

    def __call__(self, fn, *args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds.append(time.perf_counter() - started)
        return out


class NoCache:
    """Every step a full-canvas forward; ``canvas_step(canvas, start, end)`` is the canvas
    (or rows) graph's prediction of those positions (with CFG)."""

    name = "none"

    def __init__(self, backend, layout: Layout, forwards: Forwards, canvas_step):
        self.backend, self.layout, self.forwards = backend, layout, forwards
        self.canvas_step = canvas_step

    def start(self, canvas):
        if self.layout.rule != "bidirectional":  # the prefill graph runs every step
            self.backend.reset_cache(canvas.shape[0], canvas.shape[1])

    def _full(self, canvas):
        layout = self.layout
        mask = canvas_mask(layout.rule, layout.real, layout.blocks)
        return self.forwards(self.backend.prefill, canvas, layout.positions, mask)

    def predict(self, canvas, start, end, step):
        if self.layout.rule == "bidirectional":
            return self.canvas_step(canvas, start, end)
        shift = self.layout.shift
        return self._full(canvas).positions(start - shift, end - shift)

    def finish_block(self, canvas, start, end, last):
        pass


class _Cached(NoCache):
    """Shared by the cached modes: the valid-slot bookkeeping and windowed calls."""

    def start(self, canvas):
        capacity = canvas.shape[1]
        self.backend.reset_cache(canvas.shape[0], capacity)
        self.valid = np.zeros(canvas.shape, dtype=bool)

    def _refresh(self, canvas):
        """A full forward that writes every slot; its prediction covers the canvas."""
        layout = self.layout
        mask = canvas_mask(layout.rule, layout.real, layout.blocks)
        pred = self.forwards(self.backend.prefill, canvas, layout.positions, mask)
        self.valid[:] = True
        return pred

    def _window(self, canvas, first, last, write=None):
        """One cached call over canvas positions ``first:last`` (padded to a graph's rows);
        its first ``block_length`` rows are the block's predictions."""
        layout = self.layout
        batch, length = canvas.shape
        rows = self.backend.rows_for(last - first)
        queries = np.full((batch, rows), -1, dtype=np.int64)
        queries[:, : last - first] = np.arange(first, last)
        ids = np.full((batch, rows), layout.pad_id, dtype=np.int64)
        ids[:, : last - first] = canvas[:, first:last]
        positions = np.zeros((batch, rows), dtype=np.int64)
        positions[:, : last - first] = layout.positions[:, first:last]
        mask = cached_mask(layout.rule, queries, self.valid, layout.real, layout.blocks)
        return self.forwards(self.backend.cached_step, ids, positions, mask, write)


class PrefixCache(_Cached):
    name = "prefix"

    def predict(self, canvas, start, end, step):
        shift = self.layout.shift
        if step == 0:
            pred = self._refresh(canvas)
            self.valid[:, start - shift:] = False  # the block and suffix are fed each step
            return pred.positions(start - shift, end - shift)
        width = end - start
        return self._window(canvas, start - shift, canvas.shape[1]).positions(0, width)


class DualCache(_Cached):
    name = "dual"

    def predict(self, canvas, start, end, step):
        shift = self.layout.shift
        if step == 0:
            return self._refresh(canvas).positions(start - shift, end - shift)
        return self._window(canvas, start - shift, end).positions(0, end - start)


class BlockCache(_Cached):
    name = "block"

    def start(self, canvas):
        super().start(canvas)
        self._refresh(canvas)  # the prompt's complete blocks are exact: they see only earlier ones
        self.valid[:] = False
        self.valid[:, : self.layout.first_block] = True

    def predict(self, canvas, start, end, step):
        shift = self.layout.shift
        return self._window(canvas, start - shift, end).positions(0, end - start)

    def finish_block(self, canvas, start, end, last):
        if last:
            return
        shift = self.layout.shift
        # One forward over the finished block writes its keys and values once.
        self._window(canvas, start - shift, end, write=(shift, start, end - start))
        self.valid[:, start:end] = True


CLASSES = {"none": NoCache, "prefix": PrefixCache, "dual": DualCache, "block": BlockCache}


def open_mode(name: str, backend, layout: Layout, forwards: Forwards, canvas_step):
    """The mode object for ``name``; one line when the backend cannot run it."""
    if name not in CLASSES:
        raise DllmExportError(f"--cache {name!r}: choose one of {', '.join(MODES)}")
    needs_graphs = name != "none" or layout.rule != "bidirectional"
    if needs_graphs and not backend.has_cached_graphs:
        raise DllmExportError(
            f"--cache {name}{'' if name != 'none' else ' with the ' + layout.rule + ' rule'}: "
            f"this {backend.name} backend has no cached graphs; export with --cache")
    return CLASSES[name](backend, layout, forwards, canvas_step)
