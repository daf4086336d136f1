"""Progress on stderr: a live bar (images, images/s, ETA) on a terminal, nothing in logs."""

from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int, enabled: bool, stream: TextIO, label: str = "predict") -> None:
        self._bar = None
        if enabled:
            console = Console(file=stream)  # rich honours NO_COLOR and TERM=dumb itself
            self._bar = RichProgress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._bar.add_task(label, total=total, rate="")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, completed: int) -> None:
        if self._bar is None:
            return
        task = self._bar.tasks[0]
        speed = task.speed
        self._bar.update(self._task, completed=completed, rate=f"{speed:.2f} img/s" if speed else "")
