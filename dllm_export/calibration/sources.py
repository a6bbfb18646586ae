"""Calibration sources: named generator functions, each yielding ``CalibrationText``.

| name        | input                                  | yields                                  |
|-------------|----------------------------------------|-----------------------------------------|
| ``text``    | a UTF-8 text file (blank-line separated | one passage per paragraph: the first     |
|             | paragraphs, or one passage per line)    | quarter is the prompt, the rest the      |
|             |                                         | response                                 |
| ``jsonl``   | JSON Lines: ``{"prompt": ...}``,         | chat messages or a prompt, with the      |
|             | ``{"prompt", "response"}``, ``{"text"}`` | response when the line has one           |
|             | or ``{"messages": [...]}``               |                                         |
| ``tasks``   | none: the default model's own tasks     | training-side task problems (held-out    |
|             |                                         | problems are never drawn) and answers    |
| ``generic`` | none: ``generic.txt`` shipped here      | short prompts with no response           |

``open_source`` picks one from ``--calib``: a path ending in ``.jsonl`` reads JSON Lines,
any other path is text, and no path means the built-in set for the artifact (``tasks`` for
the shipped default model, ``generic`` otherwise). A response of ``None`` means the float
model writes one (``states.complete_responses``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dllm_export.errors import DllmExportError

GENERIC_FILE = Path(__file__).with_name("generic.txt")
# Training uses seed 0 (scripts/train_default_model.py); another seed gives other
# training-side problems, still disjoint from the held-out evaluation set.
TASKS_SEED = 7


@dataclass(frozen=True)
class CalibrationText:
    """One calibration example before tokenisation."""

    prompt: str | list  # plain text, or chat messages [{"role", "content"}]
    response: (
        str | None
    )  # the answer the model should produce; None: let the model write it
    chat: bool  # wrap a plain prompt in the chat template


def text_file(path: Path) -> Iterator[CalibrationText]:
    """Passages of a text file: paragraphs split by blank lines (or lines, when the file
    has no blank lines); each passage's first quarter of words prompts the rest."""
    text = _read(path)
    passages = [p.strip() for p in text.split("\n\n") if p.strip()]
    if len(passages) <= 1:
        passages = [line.strip() for line in text.splitlines() if line.strip()]
    for passage in passages:
        yield from text_passage(passage)


def jsonl_file(path: Path) -> Iterator[CalibrationText]:
    """Lines of ``{"messages": [...]}``, ``{"prompt": ..., "response": ...}`` (response
    optional; ``completion`` and ``answer`` are read as the response) or ``{"text": ...}``."""
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DllmExportError(
                f"{path}: line {number} is not JSON ({err.msg})"
            ) from None
        if not isinstance(item, dict):
            raise DllmExportError(f"{path}: line {number} must be a JSON object")
        if isinstance(item.get("messages"), list):
            messages = item["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages):
                raise DllmExportError(
                    f"{path}: line {number}: every message needs a text 'role' and 'content'")
            response = None
            if messages and messages[-1].get("role") == "assistant":
                response, messages = messages[-1].get("content"), messages[:-1]
            if messages:
                yield CalibrationText(messages, response, chat=True)
        elif isinstance(item.get("prompt"), str):
            response = next(
                (
                    item[k]
                    for k in ("response", "completion", "answer")
                    if isinstance(item.get(k), str)
                ),
                None,
            )
            yield CalibrationText(
                item["prompt"], response, chat=bool(item.get("chat", True))
            )
        elif isinstance(item.get("text"), str):
            yield from text_passage(item["text"])
        else:
            raise DllmExportError(
                f"{path}: line {number} has none of the keys messages, prompt or text"
            )


def text_passage(text: str) -> Iterator[CalibrationText]:
    words = text.split(" ")
    cut = max(1, len(words) // 4)
    yield CalibrationText(
        " ".join(words[:cut]),
        " " + " ".join(words[cut:]) if len(words) > 1 else None,
        chat=False,
    )


def default_tasks(seed: int = TASKS_SEED) -> Iterator[CalibrationText]:
    """Training-side problems of the default model's tasks, with their exact answers."""
    from dllm_export.eval.tasks import response_text, training_examples

    for example in training_examples(seed):
        yield CalibrationText(example.prompt, response_text(example), chat=True)


def generic_text() -> Iterator[CalibrationText]:
    """The shipped prompts (prose, code, arithmetic, instructions); the model answers them."""
    for line in GENERIC_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            yield CalibrationText(line.strip(), None, chat=True)


SOURCES = {
    "text": text_file,
    "jsonl": jsonl_file,
    "tasks": default_tasks,
    "generic": generic_text,
}


def _read(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise DllmExportError(f"--calib {path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DllmExportError(f"--calib {path}: not UTF-8 text") from None


def open_source(
    calib: str | Path | None, builtin: str
) -> tuple[str, Iterator[CalibrationText]]:
    """(name, iterator) for ``--calib``: a file path, a source name, or None (``builtin``)."""
    if calib is None:
        return builtin, SOURCES[builtin]()
    text = str(calib)
    if text in ("tasks", "generic"):
        return text, SOURCES[text]()
    path = Path(text)
    if not path.exists() and "/" not in text and "." not in text:
        raise DllmExportError(
            f"--calib {text!r}: neither a file nor a source name (built in: tasks, generic; "
            "or a .txt / .jsonl path)"
        )
    kind = "jsonl" if path.suffix == ".jsonl" else "text"
    return f"{kind}:{path}", SOURCES[kind](path)
