"""GeoJSON: one FeatureCollection, a Feature per instance whose geometry is a MultiPolygon with
holes, in pixel coordinates (x right, y down, the image spanning [0, W] x [0, H]).

GeoJSON has no pixel coordinate system; tools that expect longitude/latitude will place these
shapes near (0, 0). GIS users working on georeferenced rasters apply the raster's transform.
"""

from __future__ import annotations

import json
from typing import IO


class GeoJsonWriter:
    def __init__(self, out: IO[bytes], info: dict | None = None) -> None:
        self._out = out
        self._count = 0
        head = {"type": "FeatureCollection"}
        if info:
            head["segcli"] = info
        out.write(json.dumps(head, separators=(",", ":"))[:-1].encode() + b',"features":[')

    def add_record(self, record: dict) -> None:
        for index, instance in enumerate(record["instances"]):
            polygons = instance.get("polygons") or []
            feature = {
                "type": "Feature",
                "geometry": {"type": "MultiPolygon", "coordinates": polygons},
                "properties": {
                    "file": record["file"], "frame": record["frame"], "timestamp": record["timestamp"],
                    "instance": index, "category_id": instance["category_id"],
                    "category_name": instance["category_name"], "score": instance["score"],
                    "bbox": instance["bbox"], "area": instance["area"],
                },
            }
            if "track_id" in instance:
                feature["properties"]["track_id"] = instance["track_id"]
            self._out.write((b"," if self._count else b"") + json.dumps(
                feature, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
            self._count += 1

    def finish(self) -> None:
        self._out.write(b"]}")
