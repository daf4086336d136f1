"""`segcli review PRED`: the review queue (segcli.predict.review) of a predictions file: a COCO file
or JSON Lines from `segcli predict`, or any COCO dataset file whose annotations carry scores.

A file holds only the detections it was written with, so the near-threshold component sees scores
below the threshold only if the file has them: predict with a lower `--score-thr` (say 0.25) and
review with the threshold the annotators will use (`--score-thr 0.5`) to get the same rows as
`segcli predict --score-thr 0.5 --review`. The flip component needs the model and is not computed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from segcli.evaluate.inputs import read_predictions
from segcli.evaluate.masks import mask_rle
from segcli.predict.review import ReviewRow, review_row, write_csv
from segcli.errors import UsageError
from segcli.paths_guard import Output, refuse_overwrites

DEFAULT_SCORE_THR = 0.5  # predict's default, for files that do not say theirs


@dataclass
class ReviewFileOptions:
    predictions: str
    out: str | None = None  # None or "-": CSV on stdout
    score_thr: float | None = None  # None: the file's own (a segcli COCO file's info.score_thr), else 0.5


def run_review(options: ReviewFileOptions, stdin: Any = None, stdout: TextIO | None = None) -> list[ReviewRow]:
    """Score every image of the file and write the CSV; returns the rows in file order."""
    if options.score_thr is not None and not 0.0 <= options.score_thr <= 1.0:
        raise UsageError(f"--score-thr must be between 0 and 1, got {options.score_thr}")
    if options.out not in (None, "-"):
        if Path(options.out).is_dir() or str(options.out).endswith(("/", os.sep)):
            raise UsageError(f"--out {options.out!r} is a folder; give a file name such as review.csv")
        inputs = [] if str(options.predictions) == "-" else [("the predictions file", Path(options.predictions))]
        refuse_overwrites(inputs, [Output("--out", Path(options.out))])
    data = read_predictions(options.predictions, "PRED", stdin=stdin)
    records, file_thr = as_records(data, f"PRED {options.predictions}")
    threshold = options.score_thr if options.score_thr is not None else (
        file_thr if file_thr is not None else DEFAULT_SCORE_THR)
    rows = []
    for record in records:
        kept = [i for i in record["instances"] if i["score"] > threshold]
        below = [i["score"] for i in record["instances"] if i["score"] <= threshold]
        rows.append(review_row(record["file"], record.get("frame"), kept, below, threshold))
    to_stdout = options.out in (None, "-")
    write_csv(None if to_stdout else options.out, rows, stream=stdout or sys.stdout)
    return rows


def as_records(data: Any, where: str) -> tuple[list[dict], float | None]:
    """(records with RLE masks and float scores, the threshold the file says it was made with)."""
    if isinstance(data, dict) and "instances" in data:
        data = [data]  # a JSON Lines file of one line
    if isinstance(data, list) and all(isinstance(r, dict) and "instances" in r for r in data):
        return [_checked(record, where) for record in data], None
    if isinstance(data, list):
        raise UsageError(f"{where}: a results list has no file names; review the coco or jsonl output of segcli predict")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise UsageError(f"{where}: neither a COCO file (images, annotations) nor segcli predict's JSON Lines")
    by_image: dict[Any, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id") if isinstance(ann, dict) else None, []).append(ann)
    records = []
    for image in data["images"]:
        if not isinstance(image, dict) or "id" not in image:
            raise UsageError(f"{where}: an image without an id")
        video_frame = image.get("frame") is not None and image.get("video") is not None
        records.append(_checked({
            "file": image["video"] if video_frame else str(image.get("file_name", image["id"])),
            "frame": image["frame"] if video_frame else None,
            "width": image.get("width"), "height": image.get("height"),
            "instances": by_image.get(image["id"], []),
        }, where))
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    file_thr = info.get("score_thr") if isinstance(info.get("score_thr"), (int, float)) else None
    return records, file_thr


def _checked(record: dict, where: str) -> dict:
    """A record whose instances all have a number score, a box and an RLE mask (or none)."""
    name = record.get("file") if record.get("frame") is None else f"{record.get('file')}#{record.get('frame')}"
    instances = []
    for instance in record.get("instances") or []:
        score = instance.get("score") if isinstance(instance, dict) else None
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise UsageError(f"{where}: {name}: an instance without a score (ground truth? review needs predictions)")
        segmentation = instance.get("segmentation")
        if segmentation is not None:
            height, width = record.get("height"), record.get("width")
            if isinstance(segmentation, list) and not (isinstance(height, int) and isinstance(width, int)):
                raise UsageError(f"{where}: {name}: polygon masks need the image's width and height")
            if not (isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes))):
                segmentation = mask_rle(segmentation, height, width, f"{where}: {name}")
        instances.append({"score": float(score), "bbox": instance.get("bbox"), "segmentation": segmentation,
                          "category_id": instance.get("category_id")})
    return {"file": str(record.get("file")), "frame": record.get("frame"), "instances": instances}
