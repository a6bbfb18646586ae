"""Task accuracy from generated answers, generation agreement, and the speed beside them.

Speed follows the field's convention of reporting throughput next to accuracy:
``tokens_per_forward`` is answer tokens per denoiser forward per sequence (forwards
times the rows in each batch, so it equals the usual TPF at batch 1) and
``tokens_per_second`` is answer tokens over the wall time of the unmasking loops, after
one untimed warm-up call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dllm_export.eval import tasks


@dataclass
class GenerationRun:
    texts: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    generated_tokens: int = 0
    forwards: int = 0
    sequence_forwards: int = 0  # forwards times rows per batch
    seconds: float = 0.0

    def add(self, out, rows: int) -> None:
        """One ``generate`` call's output (a ``runtime.GenerationOutput``) of ``rows``."""
        self.texts += out.texts
        self.tokens += [list(t) for t in out.tokens]
        self.generated_tokens += out.generated_tokens
        self.forwards += out.forwards
        self.sequence_forwards += out.forwards * rows
        self.seconds += out.seconds

    def speed(self, batch: int) -> dict:
        return {
            "tokens_per_forward": round(self.generated_tokens / max(self.sequence_forwards, 1), 4),
            "tokens_per_second": round(self.generated_tokens / self.seconds, 2)
            if self.seconds else 0.0,
            "generated_tokens": self.generated_tokens,
            "forwards": self.forwards,
            "seconds": round(self.seconds, 3),
            "batch": batch,
        }


def generate_all(generator, prompts: list[str], batch: int, warmup: bool = True) -> GenerationRun:
    """Chat-formatted generation for every prompt, ``batch`` prompts per canvas.

    ``generator`` is anything with ``generate(prompts, chat=True)`` returning a
    ``runtime.GenerationOutput`` (its sampler options already set).
    """
    run = GenerationRun()
    if warmup and prompts:
        generator.generate(prompts[:1], chat=True)  # first calls allocate; keep them untimed
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        run.add(generator.generate(chunk, chat=True), len(chunk))
    return run


def task_scores(examples: list[tasks.Example], texts: list[str]) -> dict:
    """Exact-match accuracy per task (``tasks.score``) and their unweighted mean."""
    by_task: dict[str, list[bool]] = {}
    for example, text in zip(examples, texts, strict=True):
        by_task.setdefault(example.task, []).append(tasks.score(text, example))
    scores = {task: {"accuracy": sum(hits) / len(hits), "correct": sum(hits),
                     "count": len(hits)} for task, hits in by_task.items()}
    scores["mean"] = sum(s["accuracy"] for s in scores.values()) / max(len(by_task), 1)
    return scores


def generation_agreement(first: list[list[int]], second: list[list[int]]) -> dict:
    """Share of identical outputs, and token agreement: position-wise matches over the
    longer output of each pair, with an end marker appended so lengths count too."""
    identical = matches = total = 0
    for a, b in zip(first, second, strict=True):
        a, b = list(a) + [None], list(b) + [None]
        identical += a == b
        matches += sum(x == y for x, y in zip(a, b, strict=False))
        total += max(len(a), len(b))
    return {"identical_share": identical / max(len(first), 1),
            "token_agreement": matches / max(total, 1)}
