"""Progress on the terminal while ``profile`` exports and measures (rich)."""

from __future__ import annotations


class ProfileProgress:
    """``report(stage, detail)`` shows a spinner line; ``report(label, done, total)`` a bar
    per measurement (label such as "threshold=0.7 timing")."""

    def __init__(self, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, label: str, done, total=None):
        if total is None:  # a stage with a detail: an export, say
            key, description, done, total = label, f"[bold]{label}[/] {done}", 0, None
        else:
            key, description = label, label
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total)
        self.progress.update(
            self.tasks[key], description=description, completed=done, total=total
        )
