"""--overlay: the predictions drawn into copies of the images (JPEG) and videos (segcli.writers.overlay)."""

from __future__ import annotations

from pathlib import Path

from segcli.predict.loop import Finished, Result, RunContext, Sink, absolute_paths
from segcli.writers.overlay import OverlayWriter


class OverlaySink(Sink):
    def __init__(self, folder: Path) -> None:
        self.writer = OverlayWriter(folder)

    def on_result(self, result: Result) -> list[str]:
        decoded, record = result.decoded, result.record
        if result.prediction.frame is None:
            return absolute_paths(self.writer.out, self.writer.write_image(result.stem, decoded.image, record))
        self.writer.add_frame(result.stem, decoded.image, record, decoded.fps or 0.0)
        return []

    def on_input_done(self, done: Finished) -> list[str]:
        return absolute_paths(self.writer.out, self.writer.finish_video(done.stem)) if done.video else []

    def abort(self) -> None:
        self.writer.abort()  # unfinished overlay videos are dropped


def overlay_sink(context: RunContext) -> Sink | None:
    return OverlaySink(Path(context.options.overlay)) if context.options.overlay else None
