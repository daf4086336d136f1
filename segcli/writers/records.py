"""One image's (or video frame's) predictions as a plain JSON record: the JSON Lines line, the
unit stored in the resume journal, and what every other format is made from."""

from __future__ import annotations

import numpy as np

from segcli.ops.rle import rle_area


def build_record(
    file_name: str,
    frame: int | None,
    timestamp: float | None,
    width: int,
    height: int,
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    category_ids: np.ndarray,
    rles: list[dict],
    category_names: dict[int, str],
    poly_tolerance: float | None = None,
    pixel_centres: bool = False,
    geo: dict | None = None,
) -> dict:
    """`{"file", "frame", "timestamp", "width", "height", "instances": [...]}`; instances best first.

    Each instance: `category_id`, `category_name`, `score` (5 decimals), `bbox` `[x, y, w, h]`
    (2 decimals), `area` (mask pixels), `segmentation` (COCO RLE, string counts), and with a
    `poly_tolerance`, `polygons`: one GeoJSON-style polygon per mask part, `[exterior, *holes]`,
    each ring a closed list of `[x, y]`: around the pixels' edges, or with `pixel_centres`
    through their centres (segcli.writers.polygons). `frame` and `timestamp` are null for images.
    `geo` (segcli.data.georef), when given, is kept as the record's `geo`.
    """
    from pycocotools import mask as mask_utils

    if poly_tolerance is not None:
        # Polygons need OpenCV and shapely: loaded only by runs that write them (start-up time).
        from segcli.writers.polygons import mask_polygons
    instances = []
    areas = rle_area(rles)
    for box, score, category, rle, area in zip(np.asarray(boxes_xyxy).reshape(-1, 4), scores, category_ids, rles, areas):
        x1, y1, x2, y2 = (float(v) for v in box)
        instance = {
            "category_id": int(category),
            "category_name": category_names.get(int(category), str(int(category))),
            "score": round(float(score), 5),
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "area": int(area),
            "segmentation": {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": _text(rle["counts"])},
        }
        if poly_tolerance is not None:
            mask = mask_utils.decode(rle)
            instance["polygons"] = [
                [[[round(x, 2), round(y, 2)] for x, y in ring] for ring in [part.exterior, *part.holes]]
                for part in mask_polygons(mask, poly_tolerance, pixel_centres)
            ]
        instances.append(instance)
    record = {
        "file": file_name,
        "frame": frame,
        "timestamp": timestamp,
        "width": int(width),
        "height": int(height),
        "instances": instances,
    }
    if geo is not None:
        record["geo"] = geo
    return record


def flat_exteriors(instance: dict) -> list[list[float]]:
    """The outer ring of every part as `[x1, y1, x2, y2, ...]` (no closing point): the polygon
    form of COCO, YOLO and LabelMe, which cannot hold holes."""
    return [[v for point in polygon[0][:-1] for v in point] for polygon in instance.get("polygons", [])]


def display_name(record: dict) -> str:
    """`clip.mp4#42` for a video frame, the file name for an image (COCO `file_name`)."""
    return record["file"] if record["frame"] is None else f"{record['file']}#{record['frame']}"


def _text(counts: bytes | str) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts
