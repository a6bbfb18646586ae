"""``--show-steps``: the canvas filling in, one frame per denoising step (like llama.cpp's
``--diffusion-visual``). Masked positions show as a dim block; new commits are bold."""

from __future__ import annotations

import sys

import numpy as np

MASK_GLYPH = "░"


class CanvasView:
    def __init__(self, generator, gen_length: int, stream=None):
        from rich.console import Console
        from rich.live import Live

        self.generator = generator
        self.gen_length = gen_length
        self.console = Console(file=stream or sys.stderr, highlight=False)
        self.live = Live(console=self.console, auto_refresh=False, transient=False)
        self.live.start()

    def render(self, canvas_row: np.ndarray, fresh: np.ndarray) -> str:
        tokenizer = self.generator.tokenizer
        mask_id = self.generator.special.mask_id
        pieces = []
        for token, new in zip(canvas_row, fresh, strict=True):
            if token == mask_id:
                pieces.append(f"[dim]{MASK_GLYPH}[/]")
                continue
            text = tokenizer.decode([int(token)], skip_special_tokens=False)
            text = text.replace("[", "\\[")
            pieces.append(f"[bold green]{text}[/]" if new else text)
        return "".join(pieces)

    def __call__(self, info):
        row = info.canvas[0, -self.gen_length:]
        fresh = info.committed[0, -self.gen_length:]
        frame = f"[cyan]step {info.step:>4}[/] " + self.render(row, fresh)
        self.live.update(frame, refresh=True)

    def close(self):
        self.live.stop()
