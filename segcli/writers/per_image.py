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
    its group across a video's frames); the score is in the shape's description."""

    suffix = ".json"

    def __init__(self, out: Path) -> None:
        self.out = out

    def write(self, target: Target) -> list[str]:
        relative = target.stem + self.suffix
        path = self.out / relative
        shapes = []
        for group, instance in enumerate(target.record["instances"]):
            for ring in flat_exteriors(instance):
                shapes.append({
                    "label": instance["category_name"],
                    "points": [[ring[i], ring[i + 1]] for i in range(0, len(ring), 2)],
                    "group_id": instance.get("track_id", group),
                    "description": f"score={instance['score']}",
                    "shape_type": "polygon",
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
    """YOLO-seg: `<stem>.txt` with one line per mask part, `class x1 y1 x2 y2 ...` normalized to
    0..1; class = position of the category in `data.yaml`'s names. An image without detections
    gets an empty file (a YOLO background image). YOLO lines cannot tie parts together or hold
    holes: an instance with two parts becomes two objects of its class."""

    suffix = ".txt"

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
            for ring in flat_exteriors(instance):
                coords = [min(max(v / (width if i % 2 == 0 else height), 0.0), 1.0) for i, v in enumerate(ring)]
                lines.append(f"{self.index[instance['category_id']]} " + " ".join(f"{v:.6f}" for v in coords))
        with atomic_write(self.out / relative) as handle:
            handle.write("".join(line + "\n" for line in lines))
        return [relative]


class PngWriter:
    """`<stem>.instances.png` (16-bit: 0 background, k for the k-th instance by score; with --track,
    the instance's track id, as MOTS-style video masks number objects) and `<stem>.classes.png`
    (8-bit: 0 background, else the category id). Where masks overlap, the higher-scoring instance
    owns the pixel."""

    def __init__(self, out: Path, categories: list[dict]) -> None:
        self.out = out
        too_big = [c["id"] for c in categories if not 0 < int(c["id"]) <= 255]
        if too_big:
            from segcli.errors import UsageError

            raise UsageError(f"--format png stores category ids in 8 bits; this model has ids {too_big[:5]} outside 1..255")

    def write(self, target: Target) -> list[str]:
        import cv2
        from pycocotools import mask as mask_utils

        record = target.record
        instances = np.zeros((record["height"], record["width"]), np.uint16)
        classes = np.zeros((record["height"], record["width"]), np.uint8)
        # Paint from the lowest score up, so the best instance is painted last and wins overlaps.
        for rank in range(len(record["instances"]), 0, -1):
            instance = record["instances"][rank - 1]
            mask = mask_utils.decode(instance["segmentation"]).astype(bool)
            instances[mask] = _instance_value(instance, rank)
            classes[mask] = instance["category_id"]
        written = []
        for name, array in ((".instances.png", instances), (".classes.png", classes)):
            relative = target.stem + name
            ok, data = cv2.imencode(".png", array)
            if not ok:
                raise RuntimeError(f"PNG encoding failed for {relative}")
            with atomic_write(self.out / relative, "wb") as handle:
                handle.write(data.tobytes())
            written.append(relative)
        return written


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
