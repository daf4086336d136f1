"""The review queue: which images (and video frames) a person should look at first.

`segcli predict ... --review review.csv` scores every image or frame as it is predicted;
`segcli review preds.json` scores a predictions file afterwards. Both write one CSV row per image,
worst first. Each component below runs from 0 (nothing to see) to 1; the score is
1 - (1 - c1)(1 - c2)...: the chance that at least one component flags the image, were each the
independent probability of a needed correction. So one strong reason is enough to rank an image
high (an image where nothing was found scores 1), and more reasons rank it higher still. With t
the score threshold and B = 0.25:

- `low_confidence`: 1 - the mean, over the detections kept (score > t), of (score - t) / (1 - t);
  1 when nothing is kept (a blank, broken or unfamiliar image, or one where everything was missed).
- `near_threshold`: 1 - exp(-sum of c), c = 1 - |score - t| / B for every detection scoring within
  B of t, kept or not: a soft count of the decisions the threshold made narrowly (one score at t
  gives 0.63, three give 0.95).
- `mask_box`: the largest, over kept detections, of 1 - IoU(box, box around its mask): a mask that
  fills only part of its box, spills out of it, or is empty.
- `flip` (`--review-flip` only: it costs a second forward pass): 1 - the agreement of the kept
  detections on the image and on its mirror image (flipped back), agreement = sum of mask IoUs of
  matched pairs (same category, IoU > 0.5) / ((n + n_flipped) / 2), as panoptic quality counts it;
  0 when neither finds anything.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
from pycocotools import mask as mask_utils

from segcli.atomic import atomic_write
from segcli.errors import UsageError
from segcli.ops.assignment import match
from segcli.ops.rle_crops import crop_to_rle, rle_to_crop
from segcli.predict.core import above

if TYPE_CHECKING:
    from segcli.data.decode import Decoded
    from segcli.predict.core import ImagePrediction, Predictor

REVIEW_BAND = 0.25  # B: how far from the threshold a score still counts as a near decision
FLIP_MATCH_IOU = 0.5  # panoptic quality's threshold: above it, a match is unambiguous
STORE = "review.jsonl"  # rows of finished inputs, beside the resume journal
COLUMNS = ("rank", "file", "frame", "score", "low_confidence", "near_threshold", "mask_box", "flip",
           "detections", "below_threshold")


@dataclass(frozen=True)
class ReviewSettings:
    """`--review PATH` and `--review-flip`."""

    path: str
    flip: bool = False

    def fingerprint(self) -> dict:
        # The path is left out: the rows are the same wherever the CSV goes.
        return {"flip": self.flip, "band": REVIEW_BAND}


@dataclass
class ReviewRow:
    file: str
    frame: int | None
    score: float
    low_confidence: float
    near_threshold: float
    mask_box: float
    flip: float | None  # None: not computed (no --review-flip)
    detections: int  # kept: scoring above the threshold
    below_threshold: int  # scoring within REVIEW_BAND below the threshold (not written)


def review_row(file: str, frame: int | None, instances: list[dict], below_scores: Iterable[float], score_thr: float,
               flip: float | None = None) -> ReviewRow:
    """Score one image or frame from its kept instances (records' `score`, `bbox` [x, y, w, h],
    `segmentation` as RLE) and the scores of its detections at or below the threshold."""
    t = float(score_thr)
    kept = np.array([float(i["score"]) for i in instances], dtype=np.float64)
    below = np.array([s for s in below_scores if t - REVIEW_BAND < s <= t], dtype=np.float64)
    if len(kept) and t < 1.0:
        low_confidence = 1.0 - float(np.mean(np.clip((kept - t) / (1.0 - t), 0.0, 1.0)))
    else:
        low_confidence = 1.0
    closeness = np.clip(1.0 - np.abs(np.concatenate([kept, below]) - t) / REVIEW_BAND, 0.0, None)
    near_threshold = 1.0 - math.exp(-float(closeness.sum()))
    mask_box = max((1.0 - _box_agreement(i["bbox"], i["segmentation"]) for i in instances
                    if i.get("bbox") is not None and i.get("segmentation") is not None), default=0.0)
    parts = [low_confidence, near_threshold, mask_box] + ([flip] if flip is not None else [])
    score = 1.0 - float(np.prod([1.0 - part for part in parts]))
    return ReviewRow(file, frame, score, low_confidence, near_threshold, mask_box, flip, len(kept), len(below))


def _box_agreement(bbox: list[float], rle: dict) -> float:
    mask_box = mask_utils.toBbox(rle)
    if mask_box[2] <= 0 or mask_box[3] <= 0:
        return 0.0
    return float(mask_utils.iou([list(map(float, bbox))], [mask_box.tolist()], [0])[0][0])


def flip_disagreement(instances: list[dict], flipped_rles: list[dict], flipped_categories: Iterable[int]) -> float:
    """1 - agreement of the kept instances with the detections on the mirror image (`flipped_rles`,
    masks of the mirrored image, flipped back here); see the module docstring."""
    flipped_categories = np.asarray(list(flipped_categories))
    if not instances and not flipped_rles:
        return 0.0
    if not instances or not flipped_rles:
        return 1.0
    back = [_mirrored(rle) for rle in flipped_rles]
    iou = np.asarray(mask_utils.iou([i["segmentation"] for i in instances], back, [0] * len(back)), dtype=np.float64)
    iou = iou.reshape(len(instances), len(back))
    same = np.array([i["category_id"] for i in instances])[:, None] == flipped_categories[None, :]
    iou = np.where(same, iou, 0.0)
    matched = sum(iou[r, c] for r, c in match(iou, FLIP_MATCH_IOU))
    return 1.0 - matched / ((len(instances) + len(back)) / 2)


def _mirrored(rle: dict) -> dict:
    """The RLE of the mask flipped left to right, through its crop (no image-size array)."""
    height, width = (int(v) for v in rle["size"])
    crop = rle_to_crop(rle)
    return crop_to_rle(crop.mask[:, ::-1], width - crop.x1, crop.y0, height, width)


def ranked(rows: list[ReviewRow]) -> list[ReviewRow]:
    """Worst first; equal scores keep input order."""
    return sorted(rows, key=lambda row: -row.score)


def write_csv(path: str | Path | None, rows: list[ReviewRow], stream=None) -> None:
    """The ranked rows as CSV (COLUMNS), atomically to `path`, or to `stream` when `path` is None."""
    with (atomic_write(path, "w") if path is not None else contextlib.nullcontext(stream)) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for rank, row in enumerate(ranked(rows), start=1):
            writer.writerow([rank, row.file, "" if row.frame is None else row.frame, _number(row.score),
                             _number(row.low_confidence), _number(row.near_threshold), _number(row.mask_box),
                             "" if row.flip is None else _number(row.flip), row.detections, row.below_threshold])


def _number(value: float) -> str:
    return f"{value:.4f}"


class ReviewQueue:
    """The rows of a `segcli predict --review` run: added per image or frame, kept per input, and
    written as one CSV (also after Ctrl-C, with what was finished).

    With a resumable output the rows of each finished input are appended to `review.jsonl` in the
    run's state folder (one write per input, before the journal marks the input done), so that
    `--resume` writes the rows of reused inputs too; a torn last line is ignored, and an input done
    twice keeps its last rows."""

    def __init__(self, settings: ReviewSettings, score_thr: float, state_dir: Path | None, resume: bool,
                 reused: set[str]) -> None:
        self.settings = settings
        self.score_thr = score_thr
        self.mirrored: dict[tuple[int, int | None], ImagePrediction] = {}  # (input, frame) -> mirror image's
        self.pending: dict[str, list[ReviewRow]] = {}
        self.done: dict[str, list[ReviewRow]] = {}
        self.store = None if state_dir is None else Path(state_dir) / STORE
        if self.store is not None:
            if resume:
                self.done = {key: rows for key, rows in _read_store(self.store).items() if key in reused}
            _rewrite_store(self.store, self.done)
        self.missing = len(reused - set(self.done))  # reused inputs without rows (the store was deleted)

    def predictor_for_run(self, predictor: Predictor) -> Predictor:
        """The predictor the run should call: with `--review-flip`, one that predicts every batch
        together with its mirror images."""
        return MirroringPredictor(predictor, self.mirrored) if self.settings.flip else predictor

    def add(self, key: str, record: dict, result: ImagePrediction, decoded: Decoded) -> None:
        """Score one image or frame: `record` holds its kept instances, `result` (ImagePrediction)
        every detection the model found, `decoded` the image it was found in."""
        below = [round(float(s), 5) for s in result.scores if s <= np.float32(self.score_thr)]
        flip = None
        if self.settings.flip:
            flipped = above(self.mirrored.pop((decoded.index, decoded.frame)), self.score_thr)
            flip = flip_disagreement(record["instances"], flipped.rles, flipped.category_ids)
        row = review_row(record["file"], record["frame"], record["instances"], below, self.score_thr, flip)
        self.pending.setdefault(key, []).append(row)

    def input_done(self, key: str) -> None:
        rows = self.pending.pop(key, [])
        if self.store is not None:
            line = json.dumps({"k": key, "rows": [dataclasses.asdict(r) for r in rows]}, ensure_ascii=False) + "\n"
            with open(self.store, "ab", buffering=0) as handle:
                handle.write(line.encode("utf-8"))  # one write: a kill leaves all of it or a torn tail
        self.done[key] = rows

    def forget(self, key: str) -> None:
        self.pending.pop(key, None)

    def write(self, keys: list[str]) -> None:
        """The CSV of every finished input, `keys` giving the input order that breaks ties."""
        write_csv(self.settings.path, [row for key in keys for row in self.done.get(key, [])])


class MirroringPredictor:
    """A Predictor that predicts each batch and its mirror images in one call (twice the batch:
    batches never change an image's detections, see Predictor.predict), returns the batch's
    results and leaves the mirror images' in `mirrored`, keyed by (input, frame)."""

    def __init__(self, predictor: Predictor, mirrored: dict) -> None:
        self._predictor = predictor
        self._mirrored = mirrored

    def __getattr__(self, name: str):
        return getattr(self._predictor, name)

    def predict(self, decoded: list[Decoded]) -> list[ImagePrediction]:
        mirrors = [dataclasses.replace(d, image=np.ascontiguousarray(d.image[:, ::-1])) for d in decoded]
        results = self._predictor.predict(list(decoded) + mirrors)
        for d, mirrored in zip(decoded, results[len(decoded):]):
            self._mirrored[(d.index, d.frame)] = mirrored
        return results[:len(decoded)]


def _read_store(path: Path) -> dict[str, list[ReviewRow]]:
    rows: dict[str, list[ReviewRow]] = {}
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
        for line in handle:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn last line")
                entry = json.loads(line)
                rows[entry["k"]] = [ReviewRow(**row) for row in entry["rows"]]
            except (ValueError, KeyError, TypeError):
                break
    return rows


def _rewrite_store(path: Path, done: dict[str, list[ReviewRow]]) -> None:
    if not done:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with atomic_write(path, "w") as handle:
        for key, rows in done.items():
            handle.write(json.dumps({"k": key, "rows": [dataclasses.asdict(r) for r in rows]}, ensure_ascii=False) + "\n")


def check_review_path(settings: ReviewSettings) -> None:
    """--review names a file (that it is neither an input nor another output is checked with the
    run's other outputs, segcli.paths_guard)."""
    if str(settings.path) in ("", "-"):
        raise UsageError("--review takes a file name for the CSV, such as review.csv")
    if Path(settings.path).is_dir() or str(settings.path).endswith(("/", os.sep)):
        raise UsageError(f"--review {settings.path!r} is a folder; give a file name such as review.csv")
