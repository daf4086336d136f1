"""Per-image output formats: LabelMe JSON, YOLO-seg labels, instance/class PNGs.

Each writer puts one image's (or video frame's) files at `<out>/<stem>.<ext>`, mirroring the input
folder structure (segcli.writers.paths), each file written atomically, and returns the relative
paths it wrote (the resume journal keeps them, to remove outputs of inputs that went away).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcli.atomic import atomic_write
from segcli.ops.rle_crops import rle_to_crop
from segcli.writers.join_parts import join_parts
from segcli.writers.records import flat_exteriors


@dataclass
class Target:
    """What a per-image writer gets for one image or frame."""

    record: dict  # segcli.writers.records.build_record, with polygons
    stem: str  # relative output path without extension
    source: Path  # the input file (the video, for frames)
    image: np.ndarray | None = None  # HxWx3 uint8 RGB, for overlays


class LabelMeWriter:
    """One LabelMe JSON per image: a polygon shape per mask part; parts of one instance share a
    `group_id` (the instance's rank, best score first; with --track, its track id, so one object keeps
    its group across a video's frames); the score is in the shape's description.
    Vertices are pixel centres (LabelMe fills polygons with Pillow; segcli.writers.polygons). An
    instance whose mask has no part big enough for a polygon is a `rectangle` shape of its box."""

    suffix = ".json"
    pixel_centres = True  # records must carry centre-line polygons

    def __init__(self, out: Path) -> None:
        self.out = out

    def write(self, target: Target) -> list[str]:
        relative = target.stem + self.suffix
        path = self.out / relative
        shapes = []
        for group, instance in enumerate(target.record["instances"]):
            rings = flat_exteriors(instance)
            outlines = [("polygon", np.reshape(ring, (-1, 2))) for ring in rings] or [("rectangle", _box_corners(instance)[::2])]
            for shape_type, points in outlines:
                shapes.append({
                    "label": instance["category_name"],
                    "points": points.tolist(),
                    "group_id": instance.get("track_id", group),
                    "description": f"score={instance['score']}",
                    "shape_type": shape_type,
                    "flags": {},
                    "mask": None,
                })
        frame = target.record["frame"]
        document = {
            "version": "5.4.1",
            "flags": {},
            "shapes": shapes,
            "imagePath": _relative_to(target.source, path.parent) + ("" if frame is None else f"#{frame}"),
            "imageData": None,
            "imageHeight": target.record["height"],
            "imageWidth": target.record["width"],
        }
        with atomic_write(path) as handle:
            json.dump(document, handle, ensure_ascii=False)
        return [relative]


class YoloWriter:
    """YOLO-seg: `<stem>.txt` with one line per instance, `class x1 y1 x2 y2 ...` normalized to
    0..1; class = position of the category in `data.yaml`'s names. An image without detections
    gets an empty file (a YOLO background image). Vertices are pixel centres, as Ultralytics
    writes its own predictions and as its and supervision's readers fill polygons back
    (segcli.writers.polygons). The parts of an instance, and their holes, are joined into its one
    polygon the way Ultralytics' COCO-to-YOLO converter joins parts (segcli.writers.join_parts):
    those readers fill it back with the holes. Parts too small to be a polygon are left out; an
    instance with no part big enough is written as its box."""

    suffix = ".txt"
    pixel_centres = True  # records must carry centre-line polygons

    def __init__(self, out: Path, categories: list[dict]) -> None:
        self.out = out
        self.index = {int(c["id"]): i for i, c in enumerate(categories)}
        names = "".join(f"  {i}: {json.dumps(str(c['name']), ensure_ascii=False)}\n" for i, c in enumerate(categories))
        with atomic_write(out / "data.yaml") as handle:
            handle.write(f"# written by segcli predict: class index -> name\npath: .\nnc: {len(categories)}\nnames:\n{names}")

    def write(self, target: Target) -> list[str]:
        relative = target.stem + self.suffix
        width, height = target.record["width"], target.record["height"]
        lines = []
        for instance in target.record["instances"]:
            rings = [np.asarray(ring[:-1]) for polygon in instance.get("polygons", []) for ring in polygon]
            points = join_parts(rings) if rings else _box_corners(instance)
            coords = np.clip(points / [width, height], 0.0, 1.0).ravel()
            lines.append(f"{self.index[instance['category_id']]} " + " ".join(f"{v:.6f}" for v in coords))
        with atomic_write(self.out / relative) as handle:
            handle.write("".join(line + "\n" for line in lines))
        return [relative]


class PngWriter:
    """`<stem>.instances.png` (16-bit: 0 background, k for the k-th instance by score; with --track,
    the instance's track id, as MOTS-style video masks number objects) and `<stem>.classes.png`
    (8-bit: 0 background, else the category id). Where masks overlap, the higher-scoring instance
    owns the pixel."""

    suffixes = (".instances.png", ".classes.png")
    pixel_centres = False  # paints the RLE masks; polygons unused

    def __init__(self, out: Path, categories: list[dict]) -> None:
        self.out = out
        too_big = [c["id"] for c in categories if not 0 < int(c["id"]) <= 255]
        if too_big:
            from segcli.errors import UsageError

            raise UsageError(f"--format png stores category ids in 8 bits; this model has ids {too_big[:5]} outside 1..255")

    def write(self, target: Target) -> list[str]:
        import cv2

        record = target.record
        instances = np.zeros((record["height"], record["width"]), np.uint16)
        classes = np.zeros((record["height"], record["width"]), np.uint8)
        # Paint from the lowest score up, so the best instance is painted last and wins overlaps;
        # each in the crop around its mask (segcli.ops.rle_crops), not with an image-size mask.
        for rank in range(len(record["instances"]), 0, -1):
            instance = record["instances"][rank - 1]
            crop = rle_to_crop(instance["segmentation"])
            instances[crop.y0:crop.y1, crop.x0:crop.x1][crop.mask] = _instance_value(instance, rank)
            classes[crop.y0:crop.y1, crop.x0:crop.x1][crop.mask] = instance["category_id"]
        written = []
        for name, array in zip(self.suffixes, (instances, classes)):
            relative = target.stem + name
            ok, data = cv2.imencode(".png", array)
            if not ok:
                raise RuntimeError(f"PNG encoding failed for {relative}")
            with atomic_write(self.out / relative, "wb") as handle:
                handle.write(data.tobytes())
            written.append(relative)
        return written


def _box_corners(instance: dict) -> np.ndarray:
    """The four corners `[4, 2]` of the instance's box in pixel-centre coordinates, clockwise from
    the top left: the first and last pixel rows and columns the box covers."""
    x, y, w, h = instance["bbox"]
    left, top = round(x), round(y)
    right, bottom = max(left, round(x + w) - 1), max(top, round(y + h) - 1)
    return np.array([[left, top], [right, top], [right, bottom], [left, bottom]], dtype=np.float64)


def _instance_value(instance: dict, rank: int) -> int:
    track_id = instance.get("track_id")
    if track_id is None:
        return rank
    if track_id > 65535:
        from segcli.errors import UsageError

        raise UsageError(f"--format png holds track ids up to 65535 in 16 bits; this video has track {track_id}")
    return track_id


def _relative_to(path: Path, folder: Path) -> str:
    try:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(os.path.abspath(path)).as_posix()
