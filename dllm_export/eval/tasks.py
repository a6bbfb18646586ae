"""Tasks with checkable answers: the default model is trained on them and judged by them.

Four generators, each a function of a ``numpy.random.Generator`` that returns an
``Example`` (a user turn and its exact answer):

* ``add``: "What is 12 + 45?" -> "57"
* ``sort``: "Sort: 4 7 1" -> "1 4 7"
* ``reverse``: "Reverse: red cat sun" -> "sun cat red"
* ``recall``: "What is x in a: red, k: cat, x: sun?" -> "sun"

Held-out prompts are disjoint from training twice over. The problem space is split by a
hash: a problem is *held out* when ``crc32(task|prompt) % HELD_OUT_BUCKETS == 0``, and the
training stream skips every such problem, so no held-out prompt can ever be trained on,
however long training runs. The two sides also draw from different RNG streams
(``TRAIN_STREAM`` and ``HELD_OUT_STREAM`` in the seed sequence), so changing the number of
training steps never changes the held-out set.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

TASKS = ("add", "sort", "reverse", "recall")
HELD_OUT_BUCKETS = 16
TRAIN_STREAM = 1
HELD_OUT_STREAM = 2

# Short, common words written for this module; each becomes one BPE token in practice.
WORDS = (
    "red blue green black white gold pink gray "
    "cat dog cow fox owl bee ant pig "
    "sun moon star rain snow wind fire ice "
    "tree leaf rock sand lake hill road farm "
    "book pen cup box bag hat key map "
    "one two three four five six seven eight "
    "run jump swim walk sing read play cook "
    "big small hot cold fast slow old new"
).split()
KEYS = tuple("abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # the user turn
    answer: str  # the exact expected assistant turn


def make_add(rng: np.random.Generator, min_digits: int = 1, max_digits: int = 2) -> Example:
    """Two non-negative integers with ``min_digits``..``max_digits`` digits each."""
    a, b = (_number(rng, min_digits, max_digits) for _ in range(2))
    return Example("add", f"What is {a} + {b}?", str(a + b))


def make_sort(rng: np.random.Generator, min_count: int = 3, max_count: int = 5) -> Example:
    """Sort a few digits in ascending order (repeats allowed)."""
    values = rng.integers(0, 10, size=int(rng.integers(min_count, max_count + 1)))
    shown = " ".join(str(v) for v in values)
    return Example("sort", f"Sort: {shown}", " ".join(str(v) for v in sorted(values)))


def make_reverse(rng: np.random.Generator, min_count: int = 2, max_count: int = 4) -> Example:
    """Reverse the order of a few distinct words."""
    count = int(rng.integers(min_count, max_count + 1))
    words = [WORDS[i] for i in rng.choice(len(WORDS), size=count, replace=False)]
    return Example("reverse", f"Reverse: {' '.join(words)}", " ".join(reversed(words)))


def make_recall(rng: np.random.Generator, min_count: int = 2, max_count: int = 4) -> Example:
    """Look up the word stored under one key in a short list of key: word pairs."""
    count = int(rng.integers(min_count, max_count + 1))
    keys = [KEYS[i] for i in rng.choice(len(KEYS), size=count, replace=False)]
    values = [WORDS[i] for i in rng.choice(len(WORDS), size=count, replace=False)]
    asked = int(rng.integers(count))
    pairs = ", ".join(f"{k}: {v}" for k, v in zip(keys, values, strict=False))
    return Example("recall", f"What is {keys[asked]} in {pairs}?", values[asked])


def make_repeat(rng: np.random.Generator, min_count: int = 3, max_count: int = 5) -> Example:
    """Copy a few words: a training-only warm-up that teaches reading the prompt."""
    count = int(rng.integers(min_count, max_count + 1))
    words = [WORDS[i] for i in rng.choice(len(WORDS), size=count, replace=False)]
    return Example("repeat", f"Repeat: {' '.join(words)}", " ".join(words))


GENERATORS = {"add": make_add, "sort": make_sort, "reverse": make_reverse,
              "recall": make_recall, "repeat": make_repeat}
# The held-out addition set asks 2-digit sums (training also sees 1-digit operands).
HELD_OUT_OPTIONS = {"add": {"min_digits": 2, "max_digits": 2}}


def _number(rng: np.random.Generator, min_digits: int, max_digits: int) -> int:
    digits = int(rng.integers(min_digits, max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


def is_held_out(example: Example) -> bool:
    """True for the slice of the problem space that training never sees."""
    key = f"{example.task}|{example.prompt}".encode()
    return zlib.crc32(key) % HELD_OUT_BUCKETS == 0


class TrainingStream:
    """Deterministic training examples (held-out problems skipped) whose task mix may
    change from one draw to the next, as a curriculum does."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng([seed, TRAIN_STREAM])

    def draw(self, weights: dict) -> Example:
        """One example; ``weights`` maps task name -> relative share."""
        names = list(weights)
        shares = np.array([weights[n] for n in names], dtype=np.float64)
        while True:
            task = names[int(self.rng.choice(len(names), p=shares / shares.sum()))]
            example = GENERATORS[task](self.rng)
            if not is_held_out(example):
                return example


def training_examples(seed: int, weights: dict | None = None) -> Iterator[Example]:
    """An endless, deterministic stream of training examples (held-out problems skipped).

    Args:
        seed: the training seed; the stream depends on nothing else.
        weights: task name -> relative share (default: the evaluated tasks, equally).
    Returns:
        An iterator of ``Example``.
    """
    weights = weights or {task: 1.0 for task in TASKS}
    stream = TrainingStream(seed)
    while True:
        yield stream.draw(weights)


def held_out_examples(task: str, count: int, seed: int = 0) -> list[Example]:
    """``count`` distinct held-out problems of ``task``, the same for a given seed.

    Args:
        task: one of ``TASKS``.
        count: how many problems.
        seed: selects another fixed held-out sample (0 is the one reported in the docs).
    Returns:
        A list of ``Example``.
    """
    rng = np.random.default_rng([seed, HELD_OUT_STREAM, TASKS.index(task)])
    options = HELD_OUT_OPTIONS.get(task, {})
    chosen: dict[str, Example] = {}
    while len(chosen) < count:
        example = GENERATORS[task](rng, **options)
        if is_held_out(example):
            chosen.setdefault(example.prompt, example)
    return list(chosen.values())


def response_text(example: Example) -> str:
    """The assistant turn a model is trained to write and is scored on: the answer after one
    space, so that its first word is the same BPE token as inside the prompt ("Ġsun", not
    "sun"). ``score`` strips the space again."""
    return f" {example.answer}"


def score(answer: str, example: Example) -> bool:
    """Exact match after trimming surrounding whitespace."""
    return answer.strip() == example.answer


def task_accuracy(generator, examples: list[Example], batch_size: int = 50,
                  **sampler_overrides) -> float:
    """Exact-match accuracy of ``generator`` (a ``runtime.Generator``) on chat prompts.

    Args:
        generator: a ``dllm_export.runtime.Generator``.
        examples: the problems to ask.
        batch_size: prompts per ``generate`` call (left-padded into one canvas).
        sampler_overrides: SamplerConfig fields that replace the model's defaults.
    Returns:
        The share of exact matches, 0.0 to 1.0.
    """
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        out = generator.generate([e.prompt for e in chunk], chat=True, **sampler_overrides)
        correct += sum(score(text, e) for text, e in zip(out.texts, chunk, strict=False))
    return correct / max(len(examples), 1)
