"""Progress with an estimate for calibration's long loops: the float model's generations
(trajectories, missing answers) and ONNX Runtime's calibration passes. Both are counted in
forwards against a plan made up front, so the estimate is (forwards left) x (mean seconds
per forward so far)."""

from __future__ import annotations

import time


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class ForwardClock:
    """``tick(what)`` after each forward reports ``what: forward i/n, about T left``."""

    def __init__(self, planned: int, progress=None, stage: str = "calibration"):
        self.planned, self.done = max(planned, 1), 0
        self.progress = progress or (lambda stage, detail="": None)
        self.stage = stage
        self.started = time.perf_counter()

    def estimate(self) -> float | None:
        """Seconds left, or None before the first forward."""
        if not self.done:
            return None
        per_forward = (time.perf_counter() - self.started) / self.done
        return max(self.planned - self.done, 0) * per_forward

    def tick(self, what: str) -> None:
        self.done += 1
        self.planned = max(self.planned, self.done)
        left = self.estimate()
        self.progress(self.stage, f"{what}: forward {self.done}/{self.planned}, "
                                  f"about {format_seconds(left)} left")

    def skip(self, forwards: int) -> None:
        """Planned forwards that will not run (a generation that ended early)."""
        self.planned = max(self.planned - forwards, self.done, 1)
