"""Scored sequences and the canvases they run on.

A scored sequence is a prompt, a target and an optional tail. For the tasks it is laid out
exactly as generation fills the canvas and as training showed it: the user turn through
the chat template, then a response region of ``gen_length`` tokens holding the answer,
the end-of-turn token (the *target*) and end-of-text filler (the *tail*). Models trained
this way lean on that layout (a bare ``[prompt | answer]`` canvas is out of distribution
and scores far lower), so the harness keeps it. For lm-eval's continuations the tail is
empty.

Canvases are right-aligned and left-padded, ``[pad | prompt | target | tail]``, with
``attention_mask`` 0 on the padding, so a fixed-length artifact and PyTorch given that
length see the same inputs. The prompt is never masked; the response region (target and
tail) is what gets masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.eval import tasks


@dataclass(frozen=True)
class ScoredSequence:
    prompt: tuple[int, ...]
    target: tuple[int, ...]  # the tokens that are scored
    tail: tuple[int, ...] = ()  # masked alongside the target, never scored on its own
    task: str = ""

    @property
    def region(self) -> tuple[int, ...]:
        return self.target + self.tail

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.region)


def task_sequence(tokenizer, special, example, gen_length: int) -> ScoredSequence:
    """A ``tasks.Example`` in the generation layout: chat prompt, then the answer and
    end of turn, filled with EOS up to ``gen_length`` tokens."""
    prompt = tokenizer.format_prompt(example.prompt, chat=True)
    end = special.eot_id if special.eot_id is not None else special.eos_id
    target = tuple(tokenizer.encode(tasks.response_text(example))) + (end,)
    tail = (special.eos_id,) * max(0, gen_length - len(target))
    return ScoredSequence(tuple(prompt), target, tail, example.task)


def canvas_length(sequences: list[ScoredSequence], seq_len: int | None) -> int:
    """``seq_len`` when fixed (checked to fit), else the longest sequence."""
    longest = max(s.length for s in sequences)
    if seq_len is None:
        return longest
    if longest > seq_len:
        raise DllmExportError(
            f"a scored sequence has {longest} tokens (prompt + response) but the canvas "
            f"holds {seq_len}; re-export with a larger --seq-len, lower --gen-length or "
            "choose shorter tasks")
    return seq_len


def pack(sequences: list[ScoredSequence], length: int, pad_id: int):
    """Right-aligned rows. Returns (input_ids [B, length], attention_mask [B, length])."""
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    attention = np.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        tokens = sequence.prompt + sequence.region
        ids[row, length - len(tokens):] = tokens
        attention[row, length - len(tokens):] = 1
    return ids, attention


def region_positions(sequence: ScoredSequence, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Canvas indices of the target and of the tail in a right-aligned row."""
    start = length - len(sequence.region)
    middle = start + len(sequence.target)
    return np.arange(start, middle), np.arange(middle, length)
