"""`--track`: a `track_id` for each instance of a video frame, the same id for the same object in
every frame it appears in.

ByteTrack's two-stage association (Zhang et al., ECCV 2022), with masks, frame by frame:

1. Detections scoring above `--score-thr` are matched to every live track: those seen in the
   previous predicted frame and those lost for at most `--track-buffer` video frames.
2. Detections scoring above `--track-low-thr` but not above `--score-thr` (an occluded or blurred
   object often scores low for a few frames) are matched to the tracks seen in the previous frame
   that stage 1 left unmatched, at a stricter similarity (0.5 at least). They keep those tracks
   alive and in place but are not written: with or without `--track`, the output holds exactly
   the detections above `--score-thr` (the model runs with the lower threshold to find them,
   which changes nothing above it; see segcli.predict.candidates).
3. Every detection above `--score-thr` left unmatched starts a new track. Ids count 1, 2, ... per
   video in order of appearance and are never reused; a track unmatched for more than
   `--track-buffer` video frames ends.

The similarity of a track and a detection is 0 across categories, else the mean of their box IoU
and their mask IoU, with the track's last box and mask moved by its velocity (an exponential
average of its recent displacements per video frame) over the frames since it was last seen: the
motion model is ByteTrack's Kalman filter reduced to constant velocity, and the mask IoU tells
apart objects whose boxes overlap. Pairs are chosen to maximize the total of `similarity -
threshold` (segcli.ops.assignment), as ByteTrack's `lapjv` with a cost limit does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from segcli.errors import UsageError
from segcli.ops.assignment import match
from segcli.ops.rle_crops import MaskCrop, rle_to_crop

# ByteTrack's second stage accepts only close matches: a low score is more often a false detection.
LOW_SCORE_MIN_SIMILARITY = 0.5
# Weight of the newest displacement in the velocity average (1: last displacement only).
VELOCITY_SMOOTHING = 0.5


@dataclass(frozen=True)
class TrackSettings:
    """`--track` and its options."""

    low_thr: float = 0.1  # --track-low-thr: second-stage detections score above this
    buffer: int = 30  # --track-buffer: video frames a lost track waits to be found again
    min_similarity: float = 0.2  # --track-iou: pairs must be more similar than this (ByteTrack: IoU 0.2)

    def validate(self, score_thr: float) -> None:
        if not 0.0 <= self.low_thr <= 1.0:
            raise UsageError(f"--track-low-thr must be between 0 and 1, got {self.low_thr}")
        if self.low_thr > score_thr:
            raise UsageError(f"--track-low-thr {self.low_thr} is above --score-thr {score_thr}; "
                             f"it must be at most --score-thr (equal turns the second stage off)")
        if self.buffer < 0:
            raise UsageError(f"--track-buffer must be at least 0 video frames, got {self.buffer}")
        if not 0.0 <= self.min_similarity < 1.0:
            raise UsageError(f"--track-iou must be at least 0 and below 1, got {self.min_similarity}")

    def fingerprint(self) -> dict:
        return {"low_thr": self.low_thr, "buffer": self.buffer, "iou": self.min_similarity}


@dataclass
class Track:
    id: int
    category: int
    box: np.ndarray  # xyxy where it was last seen
    mask: MaskCrop
    last_frame: int
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # box centre, pixels per video frame
    hits: int = 1

    def offset(self, frame: int) -> np.ndarray:
        return self.velocity * (frame - self.last_frame)

    def follow(self, frame: int, box: np.ndarray, mask: MaskCrop) -> None:
        step = (_centre(box) - _centre(self.box)) / max(frame - self.last_frame, 1)
        self.velocity = step if self.hits == 1 else (1 - VELOCITY_SMOOTHING) * self.velocity + VELOCITY_SMOOTHING * step
        self.box, self.mask, self.last_frame = box, mask, frame
        self.hits += 1


@dataclass
class FrameDetections:
    """One frame's detections as the tracker reads them; masks are decoded only when needed."""

    frame: int
    boxes: np.ndarray  # [D, 4] xyxy
    category_ids: np.ndarray  # [D]
    rles: list[dict]
    _masks: dict[int, MaskCrop] = field(default_factory=dict)

    def mask(self, d: int) -> MaskCrop:
        if d not in self._masks:
            self._masks[d] = rle_to_crop(self.rles[d])
        return self._masks[d]


class Tracker:
    """The tracks of one video; `update` once per predicted frame, in frame order."""

    def __init__(self, settings: TrackSettings, score_thr: float) -> None:
        self.settings = settings
        self.score_thr = np.float32(score_thr)  # compared as the model compares its float32 scores
        self.low_thr = np.float32(settings.low_thr)
        self.tracks: list[Track] = []
        self.next_id = 1
        self.previous_frame: int | None = None

    def update(self, frame: int, boxes: np.ndarray, scores: np.ndarray, category_ids: np.ndarray,
               rles: list[dict]) -> np.ndarray:
        """Track ids of this frame's detections (0 for one that has none: below `--score-thr` and
        matched to no track). Every detection above `--score-thr` gets an id."""
        # A lost track (missed in the previous predicted frame) unseen for more than the buffer has
        # ended; its id is not handed out again.
        self.tracks = [t for t in self.tracks
                       if t.last_frame == self.previous_frame or frame - t.last_frame <= self.settings.buffer]
        scores = np.asarray(scores)
        dets = FrameDetections(frame, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(category_ids), rles)
        ids = np.zeros(len(scores), np.int64)
        high = np.flatnonzero(scores > self.score_thr)
        low = np.flatnonzero((scores > self.low_thr) & (scores <= self.score_thr))
        unmatched = self._associate(self.tracks, high, self.settings.min_similarity, dets, ids)
        seen_last_frame = [t for t in unmatched if t.last_frame == self.previous_frame]
        self._associate(seen_last_frame, low, max(self.settings.min_similarity, LOW_SCORE_MIN_SIMILARITY), dets, ids)
        for d in high[ids[high] == 0]:
            self.tracks.append(Track(self.next_id, int(dets.category_ids[d]), dets.boxes[d], dets.mask(d), frame))
            ids[d] = self.next_id
            self.next_id += 1
        self.previous_frame = frame
        return ids

    def _associate(self, tracks: list[Track], chosen: np.ndarray, threshold: float, dets: FrameDetections,
                   ids: np.ndarray) -> list[Track]:
        """Match the detections `chosen` (indices) to `tracks`, move the matched tracks there and
        give the detections their ids; returns the tracks left unmatched."""
        taken = set()
        for t, d in match(similarity(tracks, chosen, dets), threshold):
            tracks[t].follow(dets.frame, dets.boxes[chosen[d]], dets.mask(chosen[d]))
            ids[chosen[d]] = tracks[t].id
            taken.add(t)
        return [track for t, track in enumerate(tracks) if t not in taken]


def similarity(tracks: list[Track], chosen: np.ndarray, dets: FrameDetections) -> np.ndarray:
    """[tracks, chosen detections]: 0 across categories, else the mean of box IoU and mask IoU
    with the track moved to where its velocity puts it in this frame."""
    result = np.zeros((len(tracks), len(chosen)))
    if len(tracks) == 0 or len(chosen) == 0:
        return result
    offsets = np.array([t.offset(dets.frame) for t in tracks])
    predicted = np.array([t.box for t in tracks]) + np.tile(offsets, 2)
    box_iou = pairwise_box_iou(predicted, dets.boxes[chosen])
    same = np.array([t.category for t in tracks])[:, None] == dets.category_ids[chosen][None, :]
    # A mask lies inside its box, so boxes that do not meet have masks that do not either.
    for t, d in zip(*np.nonzero(same & (box_iou > 0))):
        track, mask = tracks[t], dets.mask(chosen[d])
        if track.mask.area == 0 or mask.area == 0:  # no mask to compare: the boxes decide
            result[t, d] = box_iou[t, d]
            continue
        dx, dy = (int(v) for v in np.rint(offsets[t]))
        result[t, d] = 0.5 * (box_iou[t, d] + track.mask.iou(mask, dx, dy))
    return result


class VideoTracks:
    """A Tracker for each video in progress of a run (inputs are keyed by their position)."""

    def __init__(self, settings: TrackSettings, score_thr: float) -> None:
        self.settings = settings
        self.score_thr = score_thr
        self._trackers: dict[int, Tracker] = {}

    def assign(self, index: int, frame: int, boxes: np.ndarray, scores: np.ndarray, category_ids: np.ndarray,
               rles: list[dict]) -> np.ndarray:
        """Track ids of the frame's detections above `--score-thr`, in their order."""
        tracker = self._trackers.setdefault(index, Tracker(self.settings, self.score_thr))
        ids = tracker.update(frame, boxes, scores, category_ids, rles)
        return ids[np.asarray(scores) > tracker.score_thr]

    def finish(self, index: int) -> None:
        self._trackers.pop(index, None)


def add_track_ids(record: dict, ids: np.ndarray) -> None:
    """Put each instance's `track_id` into a record (instances in the order the ids are)."""
    if len(ids) != len(record["instances"]):
        raise ValueError(f"{len(ids)} track ids for {len(record['instances'])} instances")
    for instance, track_id in zip(record["instances"], ids):
        instance["track_id"] = int(track_id)


def pairwise_box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box of `a` [N, 4] with every box of `b` [M, 4] -> [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _centre(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
