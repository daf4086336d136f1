"""CVAT's XML (what CVAT's "Upload annotations" and datumaro's `cvat` format read) from segcli's
records: `segcli predict --format cvat`.

- Images: CVAT for images 1.1, one `<image>` per image with `<polygon>` or `<mask>` shapes.
- One video: CVAT for video 1.1, where every object is a `<track>` of per-frame shapes. With
  `--track`, one track per track id: a keyframe on each frame the object was found on, and an
  `outside` shape on the first predicted frame it is missing from (CVAT then hides it until it
  comes back). Without `--track`, each detection is a track of its own frame, the way CVAT itself
  exports shapes in the video format.

A CVAT task holds images or one video, so a run mixing them is refused before any work.

Shapes: `--masks polygon` writes polygons (the records' polygons, each part its own `<polygon>` on
images; a track holds one polygon per frame, so there the largest part is kept and the others are
counted in a warning), otherwise masks (every part kept).

CVAT's mask RLE: the mask cropped to its box (`left`, `top`, `width`, `height`, in pixels, the box
inclusive), read row by row, as alternating run lengths starting with a run of 0s, comma-separated.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Callable, Iterable

import numpy as np

from segcli.ops.rle_crops import rle_to_crop
from segcli.writers.records import flat_exteriors


def cvat_mask_rle(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> tuple[str, int, int, int, int] | None:
    """(rle, left, top, width, height) of a binary mask's box crop; None for an empty mask.
    `origin` (x, y): where `mask` lies in the image (a crop of a larger mask)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())
    flat = np.asarray(mask[top:bottom + 1, left:right + 1], dtype=np.uint8).ravel()
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat[0]:
        runs.insert(0, 0)  # CVAT's runs start with 0s
    return ",".join(map(str, runs)), left + origin[0], top + origin[1], right - left + 1, bottom - top + 1


def decode_cvat_mask_rle(rle: str, width: int, height: int) -> np.ndarray:
    """The (height, width) crop of a CVAT mask RLE (for tests and reading CVAT exports)."""
    runs = [int(v) for v in rle.split(",") if v.strip()]
    flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)
    if flat.size != width * height:
        raise ValueError(f"CVAT mask RLE covers {flat.size} pixels, not {width}x{height}")
    return flat.reshape(height, width)


def refuse_unfit_inputs(items: list) -> None:
    """A CVAT task is images or one video: refuse anything else before any work."""
    from segcli.errors import UsageError

    videos = [item for item in items if item.is_video]
    if videos and (len(videos) > 1 or len(videos) < len(items)):
        raise UsageError(f"--format cvat writes one CVAT task, which holds images or one video; this run has "
                         f"{len(videos)} videos and {len(items) - len(videos)} images: predict each video on its own")


def write_cvat(handle, records: Iterable[dict], categories: list[dict], polygons: bool,
               warn: Callable[[str], None], task_name: str = "segcli") -> None:
    """CVAT XML of `records` (all images, or all frames of one video) into the binary `handle`."""
    records = iter(records)
    first = next(records, None)
    names = [category["name"] for category in categories]
    by_id = {category["id"]: category["name"] for category in categories}
    if first is not None and first["frame"] is not None:
        root = _video_document(first, records, by_id, polygons, warn)
    else:
        root = ET.Element("annotations")
        images = [] if first is None else [first]
        for index, record in enumerate(_chain(images, records)):
            element = ET.SubElement(root, "image", id=str(index), name=record["file"],
                                    width=str(record["width"]), height=str(record["height"]))
            for instance in record["instances"]:
                common = {"label": by_id[instance["category_id"]], "source": "auto", "occluded": "0", "z_order": "0"}
                for shape, attributes in _shapes(instance, polygons, every_part=True):
                    ET.SubElement(element, shape, **common, **attributes)
        _add_meta(root, task_name, len(root), "annotation", names, first)
    ET.indent(root)
    handle.write(b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n")


def _chain(head: list[dict], rest: Iterable[dict]) -> Iterable[dict]:
    yield from head
    yield from rest


def _video_document(first: dict, records: Iterable[dict], by_id: dict[int, str], polygons: bool,
                    warn: Callable[[str], None]) -> ET.Element:
    frames: list[int] = []
    # track key -> [(frame, instance)]; without --track every detection is a track of its own.
    tracks: dict[object, list[tuple[int, dict]]] = {}
    for record in _chain([first], records):
        frames.append(record["frame"])
        for number, instance in enumerate(record["instances"]):
            key = instance.get("track_id", ("shape", record["frame"], number))
            tracks.setdefault(key, []).append((record["frame"], instance))
    next_frame = dict(zip(frames, frames[1:]))
    root = ET.Element("annotations")
    dropped = 0
    for track_number, key in enumerate(sorted(tracks, key=lambda k: (tracks[k][0][0], str(k)))):
        seen = tracks[key]
        label = by_id[max(seen, key=lambda pair: pair[1]["score"])[1]["category_id"]]
        track = ET.SubElement(root, "track", id=str(track_number), label=label, source="auto")
        present = {frame for frame, _ in seen}
        for frame, instance in seen:
            shapes = _shapes(instance, polygons, every_part=False)
            dropped += max(0, len(instance.get("polygons", [])) - 1) if polygons else 0
            if not shapes:
                continue
            shape, attributes = shapes[0]
            common = {"frame": str(frame), "keyframe": "1", "outside": "0", "occluded": "0", "z_order": "0"}
            ET.SubElement(track, shape, **common, **attributes)
            after = next_frame.get(frame)
            if after is not None and after not in present:
                ET.SubElement(track, shape, **dict(common, frame=str(after), outside="1"), **attributes)
    if dropped:
        warn(f"--format cvat: a video track holds one polygon per frame; {dropped} smaller parts of "
             "multi-part masks were left out (--masks rle keeps every part)")
    _add_meta(root, "segcli", max(frames) + 1, "interpolation", list(dict.fromkeys(by_id.values())), first)
    return root


def _shapes(instance: dict, polygons: bool, every_part: bool) -> list[tuple[str, dict[str, str]]]:
    """The (tag, attributes) of an instance's CVAT shapes: its polygons (all parts, or the
    largest), or its mask."""
    if polygons:
        parts = [flat for flat in flat_exteriors(instance) if len(flat) >= 6]
        parts = parts if every_part else parts[:1]  # mask_polygons gives the largest part first
        return [("polygon", {"points": ";".join(f"{x:.2f},{y:.2f}" for x, y in zip(flat[0::2], flat[1::2]))})
                for flat in parts]
    crop = rle_to_crop(instance["segmentation"])
    encoded = cvat_mask_rle(crop.mask, (crop.x0, crop.y0))
    if encoded is None:
        return []
    rle, left, top, width, height = encoded
    return [("mask", {"rle": rle, "left": str(left), "top": str(top), "width": str(width), "height": str(height)})]


def _add_meta(root: ET.Element, task_name: str, size: int, mode: str, names: list[str], first: dict | None) -> None:
    """The `<version>` and `<meta>` CVAT's importers read first (labels; frame size for videos)."""
    meta = ET.Element("meta")
    task = ET.SubElement(meta, "task")
    ET.SubElement(task, "name").text = task_name
    ET.SubElement(task, "size").text = str(size)
    ET.SubElement(task, "mode").text = mode
    labels = ET.SubElement(task, "labels")
    for name in names:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "type").text = "any"
        ET.SubElement(label, "attributes")
    if mode == "interpolation" and first is not None:
        original = ET.SubElement(task, "original_size")
        ET.SubElement(original, "width").text = str(first["width"])
        ET.SubElement(original, "height").text = str(first["height"])
        ET.SubElement(task, "source").text = first["file"]
    version = ET.Element("version")
    version.text = "1.1"
    root.insert(0, meta)
    root.insert(0, version)
