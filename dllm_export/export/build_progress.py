"""Show TensorRT's build phases as nested progress bars (fed by ``IProgressMonitor``)."""

from __future__ import annotations

import threading


class ConsoleBuildProgress:
    """``report(event, phase, parent, count)`` for ``build_engine``; a context manager.

    TensorRT calls the monitor from its own threads, hence the lock."""

    def __init__(self, console=None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
        )

        self.progress = Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.tasks: dict[str, tuple] = {}  # phase -> (task id, depth, steps)
        self.lock = threading.Lock()

    def __call__(self, event: str, phase: str, parent: str | None, count: int) -> None:
        with self.lock:
            if event == "start":
                depth = self.tasks[parent][1] + 1 if parent in self.tasks else 0
                steps = max(count, 1)
                task = self.progress.add_task("  " * depth + phase, total=steps)
                self.tasks[phase] = (task, depth, steps)
            elif event == "step" and phase in self.tasks:
                self.progress.update(self.tasks[phase][0], completed=count + 1)
            elif event == "finish" and phase in self.tasks:
                task, depth, steps = self.tasks.pop(phase)
                if depth:  # keep only top-level phases on screen once done
                    self.progress.remove_task(task)
                else:
                    self.progress.update(task, completed=steps)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
