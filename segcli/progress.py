"""Progress on stderr: a live bar (done/total, a rate or status text, ETA) on a terminal, nothing
in logs. predict and train share it."""

from __future__ import annotations

from typing import TextIO


class Progress:
    def __init__(self, total: int, enabled: bool, stream: TextIO, label: str = "predict", completed: int = 0) -> None:
        self._bar = None
        if enabled:  # rich is imported only here: cron runs and pipes do not pay for it at start-up
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

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
            self._task = self._bar.add_task(label, total=total, completed=completed, rate="")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, completed: int, text: str | None = None) -> None:
        """Move the bar; `text` replaces the images/s column (train shows its losses there)."""
        if self._bar is None:
            return
        if text is None:
            speed = self._bar.tasks[0].speed
            text = f"{speed:.2f} img/s" if speed else ""
        self._bar.update(self._task, completed=completed, rate=text)

    def print(self, text: str) -> None:
        """A line above the live bar."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
