"""What a prediction run is asked to do (the CLI's flags as one value) and what it did."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from segcli.predict.review import ReviewSettings
from segcli.predict.shards import ShardSpec
from segcli.predict.tracking import TrackSettings

MAX_BATCH = 1024  # images per forward pass; twice as many are decoded ahead and held in memory
MAX_STREAMS = 16  # batches predicted at once (segcli.predict.streams)


@dataclass
class PredictOptions:
    sources: list[str]
    out: str | None = None  # None or "-": stdout
    weights: str = "coco"
    arch: str | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None  # None: 8 on a GPU, 1 on a CPU
    score_thr: float = 0.5
    max_det: int = 100
    format: str | None = None  # None: from --out (see plan_output): jsonl on stdout, coco for .json...
    workers: int | None = None  # None: 1 decoding thread on <= 2 cores (more would slow the model), else 2
    streams: int | None = None  # CPU: batches predicted at once, each on threads / streams (segcli.predict.streams)
    progress: bool | None = None  # None: when stderr is a terminal
    quiet: bool = False
    masks: str = "rle"  # coco, coco-results, jsonl: "rle" or "polygon"
    poly_tolerance: float = 1.0  # pixels, Douglas-Peucker tolerance of polygon outputs
    classes: Sequence[str] | None = None  # category names or ids to keep; None: all
    vid_stride: int = 1  # every N-th video frame
    overlay: str | None = None  # folder for images/videos with the predictions drawn
    resume: bool = False  # skip inputs already done by an earlier run with the same settings
    # Sliced inference of huge images (segcli.predict.slicing): "auto", "off" or a tile size in pixels.
    slice: str = "auto"
    overlap: float = 0.2
    slice_merge: str = "nmm"
    slice_match: str = "iou"
    slice_match_thr: float = 0.5
    slice_whole: bool = True
    shard: str | None = None  # "K/N": only the K-th of N slices of the inputs (segcli.predict.shards)
    rank: ShardSpec | None = None  # under torchrun: this process's slice, set by segcli.predict.torchrun
    ray: str | None = None  # run on Ray: "" for ray.init()'s own choice, else a cluster address
    ray_actors: int | None = None  # with ray: model replicas (None: one per GPU, else one per 4 CPUs)
    track: TrackSettings | None = None  # --track: ids across video frames (segcli.predict.tracking)
    review: ReviewSettings | None = None  # --review: the review-queue CSV (segcli.predict.review)
    image_url_prefix: str | None = None  # --format label-studio: images at PREFIX + file_name


@dataclass
class PredictSummary:
    images: int = 0  # images predicted in this run
    frames: int = 0  # video frames predicted in this run
    detections: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    reused: int = 0  # inputs already done by an earlier run (--resume)
    notes: list[tuple[str, str]] = field(default_factory=list)  # warnings that are not failures
    ignored: Counter[str] = field(default_factory=Counter)  # files in SOURCE folders of other types, by extension
    first_result_at: float | None = None  # time.perf_counter() when the first image or frame was done
