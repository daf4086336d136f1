"""What `segcli train` shows while it runs: a live line on a terminal (losses, lr, images/s, ETA),
plain lines in logs (cron, CI, `2> train.log`), always on stderr."""

from __future__ import annotations

import time
from typing import TextIO

from segcli.progress import Progress
from segcli.train.timing import breakdown_text

LIVE_EVERY = 5  # iterations between updates of the live display


def _losses_text(line: dict) -> str:
    names = ("loss", "rpn_objectness", "rpn_box", "roi_class", "roi_box", "mask")
    return " ".join(f"{name} {line[name]:.3f}" for name in names if name in line)


class TrainDisplay:
    def __init__(self, total: int, start: int, enabled: bool, live: bool | None, log_every: int, stream: TextIO) -> None:
        self.total, self.start, self.enabled, self.stream = total, start, enabled, stream
        self.log_every = max(1, log_every)
        self.live = enabled and (live if live is not None else stream.isatty())
        self.started = time.time()
        self._bar = Progress(total, self.live, stream, label="train", completed=start)  # inert unless live

    def __enter__(self) -> TrainDisplay:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def wants(self, iteration: int) -> bool:
        """Whether this iteration's losses are read (for the display, metrics.jsonl and the NaN check)."""
        every = min(self.log_every, LIVE_EVERY) if self.live else self.log_every
        return iteration % every == 0 or iteration == self.total

    def update(self, iteration: int, line: dict) -> None:
        if not self.enabled:
            return
        if self.live:
            text = f"epoch {line['epoch']} {_losses_text(line)} lr {line['lr']:.2e} {line['images_per_s']:.2f} img/s"
            self._bar.update(iteration, text)
        elif iteration % self.log_every == 0 or iteration == self.total:
            done = iteration - self.start
            eta = (time.time() - self.started) / max(done, 1) * (self.total - iteration)
            print(f"segcli: epoch {line['epoch']} iteration {iteration}/{self.total} {_losses_text(line)} "
                  f"lr {line['lr']:.2e} {line['images_per_s']:.2f} img/s ETA {eta / 60:.1f} min",
                  file=self.stream, flush=True)

    def epoch_done(self, record: dict) -> None:
        if not self.enabled:
            return
        parts = [f"epoch {record['epoch']} done in {record['seconds']:.0f} s", f"loss {record.get('train_loss', float('nan')):.3f}"]
        if "val_segm_AP" in record:
            parts.append(f"val mask AP {record['val_segm_AP']:.3f} box AP {record['val_bbox_AP']:.3f}")
        lines = ["segcli: " + ", ".join(parts)]
        if record.get("step_ms"):
            lines.append(f"segcli: epoch {record['epoch']} {breakdown_text(record['step_ms'])}")
        for text in lines:
            if self.live:
                self._bar.print(text)
            else:
                print(text, file=self.stream, flush=True)
