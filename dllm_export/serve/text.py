"""The answer text of one request as its committed prefix grows.

Diffusion commits positions in any order; a client can only be shown the leading run of
committed positions, since a masked position before them may still become anything. Each
update hands the answer tokens of that run (up to EOS); this turns them into text deltas
that only ever extend what was sent: held back are a tail that could be the start of a stop
sequence and an incomplete UTF-8 character (decoded as U+FFFD).
"""

from __future__ import annotations


class AnswerText:
    def __init__(self, decode, stops: list[str], max_tokens: int):
        self.decode = decode
        self.stops = stops
        self.max_tokens = max_tokens
        self.sent = ""
        self.finish: str | None = None  # "stop" once a stop sequence is found
        self.tokens = 0  # answer tokens the text covers

    def _cut(self, text: str) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return text[: min(hits)], True
        return text, False

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that must wait for the next update."""
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        if text.endswith("\ufffd"):
            hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
        return hold

    def update(self, tokens: list[int], final: bool = False) -> str:
        """The new text for the answer tokens committed so far ('' if none can be sent)."""
        if self.finish:
            return ""
        tokens = tokens[: self.max_tokens]
        text, stopped = self._cut(self.decode(tokens))
        if stopped:
            self.finish = "stop"
        elif not final:
            text = text[: len(text) - self._held(text)]
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        self.tokens = len(tokens)
        return delta
