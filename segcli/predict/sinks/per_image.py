"""Per-image formats (LabelMe, YOLO, PNG masks): one file or a few per image or frame, written as
results come into the folder --out (segcli.predict.formats registers their writers)."""

from __future__ import annotations

from segcli.predict.formats import FORMATS
from segcli.predict.loop import Result, RunContext, Sink, absolute_paths
from segcli.writers.paths import frame_stem
from segcli.writers.per_image import Target


class PerImageSink(Sink):
    def __init__(self, context: RunContext) -> None:
        self.out = context.plan.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.writer = FORMATS[context.plan.format].writer(self.out, context.categories)

    def on_result(self, result: Result) -> list[str]:
        target = Target(result.record, frame_stem(result.stem, result.prediction.frame), result.item.path)
        return absolute_paths(self.out, self.writer.write(target))


def per_image_sink(context: RunContext) -> Sink | None:
    return PerImageSink(context) if context.plan.per_image else None
