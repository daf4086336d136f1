"""GeoJSON: one FeatureCollection, a Feature per instance whose geometry is a MultiPolygon with
holes. Exterior rings run counter-clockwise and holes clockwise (RFC 7946's right-hand rule).

Coordinates are the image's own map coordinates when every image in the file is a georeferenced
TIFF in one coordinate reference system (segcli.data.georef): the file then names that CRS in the
`crs` member. RFC 7946 dropped `crs` (its GeoJSON is WGS 84 longitude/latitude only), but it is
the member GDAL's GeoJSON driver reads and writes for other systems (`{"type": "name",
"properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}`), so QGIS, GDAL/OGR, geopandas and
PostGIS place the shapes on the map. Otherwise coordinates are pixels (x right, y down, the image
spanning [0, W] x [0, H]); tools that expect longitude/latitude will place those near (0, 0).
The `bbox` and `area` properties are always in pixels.
"""

from __future__ import annotations

import json
import math
from typing import IO, Callable, Iterable

import numpy as np


class GeoJsonWriter:
    def __init__(self, out: IO[bytes], info: dict | None = None, crs: str | None = None) -> None:
        """`crs`: write map coordinates in this CRS (every record added must carry its `geo`)."""
        self._out = out
        self._count = 0
        self._crs = crs
        head = {"type": "FeatureCollection"}
        if crs is not None:
            head["crs"] = {"type": "name", "properties": {"name": crs}}
        if info:
            head["segcli"] = info
        out.write(json.dumps(head, separators=(",", ":"))[:-1].encode() + b',"features":[')

    def add_record(self, record: dict) -> None:
        transform = None
        if self._crs is not None:
            if record.get("geo", {}).get("crs") != self._crs:
                raise ValueError(f"{record['file']}: not georeferenced in {self._crs}")
            transform = record["geo"]["transform"]
        for index, instance in enumerate(record["instances"]):
            polygons = instance.get("polygons") or []
            if transform is not None:
                polygons = to_map(polygons, transform)
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


def write_geojson(out: IO[bytes], records: Callable[[], Iterable[dict]], info: dict | None,
                  warn: Callable[[str], None]) -> None:
    """The whole FeatureCollection of `records()` (called twice: the CRS must be known before the
    first feature is written), in map coordinates when `shared_crs` finds one."""
    writer = GeoJsonWriter(out, info, shared_crs(records(), warn))
    for record in records():
        writer.add_record(record)
    writer.finish()


def shared_crs(records: Iterable[dict], warn: Callable[[str], None]) -> str | None:
    """The CRS every record is georeferenced in, or None (pixel coordinates). One FeatureCollection
    holds one coordinate system: georeferenced and plain images together, or two CRSs, are
    written in pixels, with a warning."""
    systems, plain = set(), 0
    for record in records:
        geo = record.get("geo")
        if geo is None:
            plain += 1
        else:
            systems.add(geo["crs"])
    if not systems:
        return None
    if len(systems) == 1 and not plain:
        return systems.pop()
    what = f"{len(systems)} coordinate systems" if len(systems) > 1 else "images without a georeference"
    warn(f"--format geojson: georeferenced TIFFs come with {what}; one GeoJSON file holds one coordinate "
         f"system, so all its coordinates are pixels (write each system's images to a file of its own)")
    return None


def to_map(polygons: list, transform: list[float]) -> list:
    """Polygons (`[exterior, *holes]`, rings of `[x, y]` pixels) in map coordinates, rounded to a
    hundredth of a pixel, with the rings' orientation kept (a north-up raster flips the y axis)."""
    a, b, c, d, e, f = transform
    matrix = np.array([[a, d], [b, e]])
    flip = a * e - b * d < 0
    digits = _decimals(abs(a * e - b * d))
    mapped = []
    for polygon in polygons:
        rings = []
        for ring in polygon:
            points = np.asarray(ring, dtype=np.float64) @ matrix + [c, f]
            if flip:
                points = points[::-1]
            rings.append(np.round(points, digits).tolist())
        mapped.append(rings)
    return mapped


def _decimals(pixel_area: float) -> int:
    """Decimals that keep a hundredth of a pixel: 3 for 0.5 m pixels, 7 for 1e-5 degree ones."""
    if not pixel_area > 0:
        return 12
    return int(min(12, max(0, math.ceil(-math.log10(math.sqrt(pixel_area) / 100)))))
