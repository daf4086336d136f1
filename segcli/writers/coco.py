"""Stream predictions into a COCO file whose size, not our memory, grows with the number of images.

Images and annotations are appended, one JSON object per line, to temporary files beside the
output while the run goes; `close()` assembles the final JSON from them and writes it atomically,
so a reader sees either the previous file or a complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, Iterable

import numpy as np

from segcli.atomic import atomic_write, temporary_prefix
from segcli.ops.rle import rle_area


class CocoWriter:
    """Write detections as a COCO dataset file, or as a bare results list (`results_only=True`).

    Dataset form: `{"info", "licenses": [], "images", "categories", "annotations"}`, loadable with
    `pycocotools.coco.COCO`. Results form: `[{"image_id", "category_id", "bbox", "score",
    "segmentation"}]`, loadable with `COCO.loadRes`; image ids are the ones the dataset form would
    have (1, 2, ... in `add_image` order), so the two can be paired. Ids start at 1; bbox is
    `[x, y, w, h]` rounded to 2 decimals, score to 5; area is the mask area.

    As a context manager: a clean exit writes the file; an exception discards everything (the
    temporary files are removed, an existing file at `path` is left untouched). A caller that wants
    the images finished so far despite the exception (Ctrl-C) calls `close()` itself before leaving
    the block; everything added so far is then a valid file:

        with CocoWriter(path, categories) as writer:
            try:
                ...
            except KeyboardInterrupt:
                writer.close(partial_ok=True)
                raise
    """

    def __init__(
        self,
        path: Path,
        categories: list[dict],
        results_only: bool = False,
        info: dict | None = None,
    ) -> None:
        self.path = Path(path)
        self.results_only = results_only
        self._categories = [_category(c) for c in categories]
        self._category_ids = {c["id"] for c in self._categories}
        if len(self._category_ids) != len(self._categories):
            raise ValueError("category ids must be unique")
        self._info = _plain(info) if info is not None else {"description": "segcli predictions"}
        self._next_image_id = 1
        self._next_annotation_id = 1
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Spools hold one JSON record per line; *_end are the byte lengths of complete commits.
        self._images = self._spool("images")
        self._annotations = self._spool("annotations")
        self._images_end = 0
        self._annotations_end = 0
        self._dirty = False
        # If the writer is dropped without close(), still remove the spool files.
        self._cleanup = weakref.finalize(self, _remove_spools, [self._images, self._annotations])

    def _spool(self, what: str) -> IO[bytes]:
        # Beside the output: same disk as the result, and visible to whoever cleans that folder.
        # Named by host and pid: the next atomic write of this output removes spools a SIGKILL left.
        return tempfile.NamedTemporaryFile(
            "w+b", prefix=temporary_prefix(self.path), suffix=f".{what}.tmp", dir=self.path.parent, delete=False
        )

    def __enter__(self) -> CocoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(partial_ok=exc_type is None)

    def add_image(
        self,
        file_name: str,
        width: int,
        height: int,
        boxes_xyxy: np.ndarray,
        scores: np.ndarray,
        category_ids: np.ndarray,
        rles: list[dict],
    ) -> int:
        """Record one image and its K detections (arrays of length K, boxes [K, 4]); return its id.

        An image with K == 0 still appears in `images`. Category ids must be among the writer's
        categories (catches contiguous model labels passed where COCO ids are expected).
        """
        if self._closed:
            raise RuntimeError("CocoWriter is closed")
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        category_ids = np.asarray(category_ids).reshape(-1)
        count = len(boxes)
        if not (len(scores) == len(category_ids) == len(rles) == count):
            raise ValueError(
                f"detections disagree in length: {count} boxes, {len(scores)} scores, "
                f"{len(category_ids)} category ids, {len(rles)} masks"
            )
        unknown = {int(c) for c in category_ids} - self._category_ids
        if unknown:
            raise ValueError(f"unknown category ids {sorted(unknown)}")

        image_id = self._next_image_id
        detections = zip(boxes, scores, category_ids, rles, rle_area(rles))
        lines = [
            _json_line(self._annotation(self._next_annotation_id + k, image_id, box, score, int(category), rle, area))
            for k, (box, score, category, rle, area) in enumerate(detections)
        ]
        image = {"id": image_id, "file_name": str(file_name), "width": int(width), "height": int(height)}
        self._commit(b"" if self.results_only else _json_line(image), b"".join(lines))
        self._next_image_id += 1
        self._next_annotation_id += len(lines)
        return image_id

    def add_record(self, record: dict, polygons: bool = False) -> int:
        """Add one image record (segcli.writers.records) and return its image id.

        Video frames become images named `file#frame` with extra `video`, `frame` and
        `timestamp` fields. With `polygons`, segmentations are the records' outer rings (COCO
        polygons cannot hold holes); instances whose mask gave no polygon keep their RLE.
        """
        if self._closed:
            raise RuntimeError("CocoWriter is closed")
        image_id = self._next_image_id
        lines = []
        for k, instance in enumerate(record["instances"]):
            annotation = self._from_instance(self._next_annotation_id + k, image_id, instance, polygons)
            lines.append(_json_line(annotation))
        image = {"id": image_id, "file_name": record["file"], "width": record["width"], "height": record["height"]}
        if record.get("frame") is not None:
            image.update(file_name=f"{record['file']}#{record['frame']}", video=record["file"],
                         frame=record["frame"], timestamp=record["timestamp"])
        self._commit(b"" if self.results_only else _json_line(image), b"".join(lines))
        self._next_image_id += 1
        self._next_annotation_id += len(lines)
        return image_id

    def _from_instance(self, annotation_id: int, image_id: int, instance: dict, polygons: bool) -> dict:
        category_id = instance["category_id"]
        if category_id not in self._category_ids:
            raise ValueError(f"unknown category id {category_id}")
        segmentation = instance["segmentation"]
        if polygons:
            rings = [[v for point in polygon[0][:-1] for v in point] for polygon in instance.get("polygons", [])]
            segmentation = rings or segmentation
        if self.results_only:
            annotation = {"image_id": image_id, "category_id": category_id, "bbox": instance["bbox"],
                          "score": instance["score"], "segmentation": segmentation}
        else:
            annotation = {"id": annotation_id, "image_id": image_id, "category_id": category_id,
                          "bbox": instance["bbox"], "area": float(instance["area"]), "segmentation": segmentation,
                          "score": instance["score"], "iscrowd": 0}
        if "track_id" in instance:  # --track: as CVAT exports video tracks to COCO (and imports them back)
            annotation["track_id"] = instance["track_id"]
            if not self.results_only:
                annotation["attributes"] = {"track_id": instance["track_id"], "keyframe": True}
        return annotation

    def _annotation(
        self, annotation_id: int, image_id: int, box: np.ndarray, score: float, category_id: int, rle: dict, area
    ) -> dict:
        x1, y1, x2, y2 = (float(v) for v in box)
        bbox = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
        segmentation = {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": _text(rle["counts"])}
        if self.results_only:
            return {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": bbox,
                "score": round(float(score), 5),
                "segmentation": segmentation,
            }
        return {
            "id": annotation_id,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": float(area),
            "segmentation": segmentation,
            "score": round(float(score), 5),
            "iscrowd": 0,
        }

    def _commit(self, image_line: bytes, annotation_lines: bytes) -> None:
        """Append one image's records so that an interruption leaves no trace of it.

        A Ctrl-C can land between the two writes; the caller may then still `close()` and keep
        the images before this one. So the spools are cut back to the end of the last complete
        commit before writing, and at close.
        """
        self._rewind_incomplete()
        self._dirty = True
        self._annotations.write(annotation_lines)
        self._images.write(image_line)
        self._images_end += len(image_line)
        self._annotations_end += len(annotation_lines)
        self._dirty = False

    def _rewind_incomplete(self) -> None:
        if not self._dirty:
            return
        for spool, end in ((self._images, self._images_end), (self._annotations, self._annotations_end)):
            spool.seek(end)
            spool.truncate()
        self._dirty = False

    def close(self, partial_ok: bool = True) -> None:
        """Finish: write the file from everything added so far, or with `partial_ok=False` write nothing.

        The writer cannot know whether the run finished; the caller does. `partial_ok=True` (the
        default, and what a clean `with` exit does) writes a valid file of the images added so far.
        `partial_ok=False` (what an exception leaving the `with` block does) discards them and
        leaves any existing file at `path` untouched. Spool files are removed either way. Calling
        close again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if partial_ok:
                self._rewind_incomplete()
                with atomic_write(self.path, "wb") as out:
                    self._assemble(out)
        finally:
            self._cleanup()

    def abort(self) -> None:
        """Discard everything; same as `close(partial_ok=False)`."""
        self.close(partial_ok=False)

    @property
    def images_written(self) -> int:
        """How many images have been added."""
        return self._next_image_id - 1

    def _assemble(self, out: IO[bytes]) -> None:
        if self.results_only:
            out.write(b"[")
            _copy_records(self._annotations, out)
            out.write(b"]")
            return
        out.write(b'{"info":' + _json(self._info) + b',"licenses":[],"images":[')
        _copy_records(self._images, out)
        out.write(b'],"categories":' + _json(self._categories) + b',"annotations":[')
        _copy_records(self._annotations, out)
        out.write(b"]}")


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _json_line(record: dict) -> bytes:
    # json escapes newlines inside strings, so one record is always exactly one line.
    return _json(record) + b"\n"


def _copy_records(spool: IO[bytes], out: IO[bytes]) -> None:
    """Copy one-per-line JSON records into `out` as comma-separated array items, line by line."""
    spool.flush()
    spool.seek(0)
    for index, line in enumerate(spool):
        if index:
            out.write(b",")
        out.write(line.rstrip(b"\n"))


def _remove_spools(spools: Iterable[IO[bytes]]) -> None:
    for spool in spools:
        with contextlib.suppress(OSError):
            spool.close()
        with contextlib.suppress(OSError):
            os.unlink(spool.name)


def _category(category: dict) -> dict:
    result = {"id": int(category["id"]), "name": str(category["name"])}
    if category.get("supercategory") is not None:
        result["supercategory"] = str(category["supercategory"])
    return result


def _plain(value):
    """`value` with numpy scalars and arrays turned into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _text(counts: bytes | str) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts
