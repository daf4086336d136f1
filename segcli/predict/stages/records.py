"""The stage that turns a prediction into its output record (segcli.writers.records), the form
every sink reads: file name, frame, size, and per instance box, score, category and mask (RLE, and
polygons when the format needs them)."""

from __future__ import annotations

from segcli.data.georef import GeoReader
from segcli.predict.formats import FORMATS
from segcli.predict.loop import Result, RunContext, Stage
from segcli.writers.records import build_record


class RecordStage(Stage):
    def __init__(self, context: RunContext) -> None:
        plan = context.plan
        self.category_names = {int(c["id"]): str(c["name"]) for c in context.categories}
        self.poly_tolerance = context.options.poly_tolerance if plan.polygons else None
        # LabelMe and YOLO read polygons through pixel centres; PNG paints the RLE masks.
        fmt = FORMATS[plan.format]
        self.pixel_centres = fmt.per_image and fmt.pixel_centres
        # GeoJSON of georeferenced TIFFs is written in their own CRS (segcli.writers.geojson).
        self.georef = GeoReader(context.warn) if plan.format == "geojson" else None

    def on_result(self, result: Result) -> None:
        p = result.prediction
        geo = self.georef.read(result.item.path, p.width, p.height) if self.georef and p.frame is None else None
        result.record = build_record(result.item.file_name, p.frame, p.timestamp, p.width, p.height, p.boxes, p.scores,
                                     p.category_ids, p.rles, self.category_names, self.poly_tolerance,
                                     pixel_centres=self.pixel_centres, geo=geo.as_record() if geo else None)


def record_stage(context: RunContext) -> Stage:
    return RecordStage(context)
