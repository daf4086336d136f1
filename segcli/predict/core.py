"""`segcli predict`: sources -> decoded images and video frames -> batches on the device ->
detections -> records -> the chosen output format.

Decoding runs in background threads (segcli.data.decode) while the model works; results are
encoded and handed on image by image (frame by frame), so memory does not grow with the folder or
the video. Formats that are one file (COCO, JSON Lines, GeoJSON) are assembled at the end from the
resume journal (segcli.writers.journal), in input order; per-image formats and overlays are
written as results come. JSON Lines on stdout is written line by line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterable, Iterator, Sequence, TextIO

import numpy as np
import torch

from segcli import __version__
from segcli.atomic import atomic_write
from segcli.data.decode import Decoded, InputDone, iter_decoded
from segcli.data.georef import GeoReader
from segcli.data.sources import InputItem, expand_sources
from segcli.predict.candidates import above, masks_above, model_threshold
from segcli.device import prepare_for_inference, resolve_device, resolve_precision
from segcli.progress import Progress
from segcli.predict.review import ReviewQueue, ReviewSettings, check_review_path
from segcli.predict.shards import ShardRun, ShardSpec
from segcli.predict.slicing import SlicedPredictor, SliceSettings
from segcli.predict.tracking import TrackSettings, VideoTracks, add_track_ids
from segcli.errors import UsageError
from segcli.model.build import model_from_checkpoint
from segcli.model.maskrcnn import Detections, MaskRCNN
from segcli.model.roi_heads import CUDA_CANDIDATE_CAP, DetectionSettings
from segcli.ops.rle import encode_masks
from segcli.ops.rle_crops import crop_to_rle
from segcli.paths_guard import Output, file_inputs, first_missing, refuse_overwrites
from segcli.text import escaped
from segcli.weights import Checkpoint, resolve_weights
from segcli.writers.coco import CocoWriter
from segcli.writers.geojson import write_geojson
from segcli.writers.journal import Journal, Signature, state_dir_for
from segcli.writers.jsonl import JsonlWriter, record_line
from segcli.writers.overlay import OverlayWriter
from segcli.writers.paths import frame_stem, output_stems
from segcli.writers.per_image import LabelMeWriter, PngWriter, Target, YoloWriter
from segcli.writers.records import build_record

ONE_FILE_FORMATS = ("coco", "coco-results", "jsonl", "geojson")
PER_IMAGE_FORMATS = ("labelme", "yolo", "png")
FORMATS = ONE_FILE_FORMATS + PER_IMAGE_FORMATS
MASK_ENCODINGS = ("rle", "polygon")
_SUFFIX_FORMATS = {".json": "coco", ".jsonl": "jsonl", ".ndjson": "jsonl", ".geojson": "geojson"}
MAX_BATCH = 1024  # images per forward pass; twice as many are decoded ahead and held in memory


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


@dataclass
class ImagePrediction:
    """One image's detections, ready for a writer (numpy, original-image coordinates)."""

    item: InputItem
    width: int
    height: int
    boxes: np.ndarray  # [K, 4] xyxy
    scores: np.ndarray  # [K]
    category_ids: np.ndarray  # [K] the checkpoint's own category ids
    rles: list[dict]  # K COCO RLEs
    frame: int | None = None  # video frames: index in the video
    timestamp: float | None = None  # video frames: seconds from the start


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


class Predictor:
    """A loaded model with its categories: uint8 images in, per-image predictions out."""

    def __init__(self, model: MaskRCNN, checkpoint: Checkpoint, device: torch.device,
                 category_ids: Collection[int] | None = None) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.device = device
        self.label_to_category = torch.tensor(checkpoint.label_to_category_id)
        # Models that cannot restrict their labels (exported ones) are filtered after the fact.
        self.category_ids = None if category_ids is None else torch.tensor(sorted(category_ids))
        # Detections scoring at most this get an empty mask, unpasted (MaskRCNN.forward's
        # masks_above): candidates read for their scores alone (--review without --track).
        self.masks_above: float | None = None

    @classmethod
    def load(cls, weights: str, arch: str | None, device: str, precision: str, score_thr: float, max_det: int,
             progress: bool = True, classes: Sequence[str] | None = None) -> Predictor:
        if not 0.0 <= score_thr <= 1.0:
            raise UsageError(f"--score-thr must be between 0 and 1, got {score_thr}")
        if max_det < 1:
            raise UsageError(f"--max-det must be at least 1, got {max_det}")
        # Files written by `segcli export` (.onnx, TorchScript) run through their own runtime (issue 5);
        # it applies --score-thr, --max-det and --classes to the exported model's outputs.
        from segcli.export.runtime import exported_format, load_exported

        if exported_format(weights) is not None:
            model, checkpoint = load_exported(weights, device, precision)
            wanted = resolve_classes(classes, checkpoint.categories)
            known = {c["id"] for c in checkpoint.categories} if wanted is None else wanted
            model.configure(score_thr, max_det, [cid in known for cid in checkpoint.label_to_category_id])
            return cls(model, checkpoint, torch.device("cpu"))
        torch_device = resolve_device(device)
        precision = resolve_precision(precision, torch_device)  # a bad flag stops before weights are fetched
        checkpoint = resolve_weights(weights, arch, progress=progress)
        # torchvision scores candidates above 0.05; a higher user threshold is applied before NMS,
        # which keeps exactly the detections torchvision would keep above it (see roi_heads).
        settings = DetectionSettings(score_threshold=max(score_thr, 0.0), max_detections=max_det,
                                     candidate_cap=CUDA_CANDIDATE_CAP if torch_device.type == "cuda" else None)
        wanted = resolve_classes(classes, checkpoint.categories)
        model = model_from_checkpoint(checkpoint, settings)
        known = {c["id"] for c in checkpoint.categories} if wanted is None else wanted
        # Restricting labels before NMS and --max-det makes --classes keep the best N of those classes.
        model.roi_heads.restrict_labels([cid in known for cid in checkpoint.label_to_category_id])
        model = prepare_for_inference(model, torch_device, precision, fuse=True)
        return cls(model, checkpoint, torch_device, wanted)

    def predict(self, decoded: list[Decoded]) -> list[ImagePrediction]:
        """Predict a batch, run as sub-batches of images with the same padded network input size.

        Padding an image further than it would be alone changes the features near its bottom and
        right edges (activations over padding are not zero), so results would depend on which
        images share a batch. Grouping by padded size makes every image's result the same as when
        it runs alone, whatever the batch size; folders of same-sized photos still batch fully.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(decoded):
            groups.setdefault(self.model.padded_input_size(*item.image.shape[:2]), []).append(index)
        results: list[ImagePrediction | None] = [None] * len(decoded)
        for indices in groups.values():
            batch, sizes = collate([decoded[i].image for i in indices], pin=self.device.type == "cuda")
            images = batch.to(self.device, non_blocking=True)
            if self.masks_above is None:
                detections = self.model(images, sizes)
            else:
                detections = self.model(images, sizes, masks_above=self.masks_above)
            for position, index in enumerate(indices):
                results[index] = self._image_result(detections, position, decoded[index])
        return results

    def _image_result(self, detections: Detections, index: int, decoded: Decoded) -> ImagePrediction:
        rows = detections.rows(index)
        height, width = detections.image_sizes[index]
        scores = detections.scores[rows].cpu().numpy()
        if self.masks_above is None:
            rles = encode_masks(detections.paste_masks(index).cpu().numpy())
        else:  # scores descend within an image: the detections with masks come first
            masked = int((scores > np.float32(self.masks_above)).sum())
            rles = encode_masks(detections.paste_masks(index, count=masked).cpu().numpy())
            if masked < len(scores):
                empty = crop_to_rle(np.zeros((0, 0), bool), 0, 0, height, width)
                rles += [dict(empty) for _ in range(len(scores) - masked)]
        category_ids = self.label_to_category[detections.labels[rows].cpu()]
        keep = np.ones(len(scores), bool) if self.category_ids is None else torch.isin(category_ids, self.category_ids).numpy()
        return ImagePrediction(
            item=decoded.item,
            width=width,
            height=height,
            boxes=detections.boxes[rows].cpu().numpy()[keep],
            scores=scores[keep],
            category_ids=category_ids.numpy()[keep],
            rles=[rle for rle, kept in zip(rles, keep) if kept],
            frame=decoded.frame,
            timestamp=decoded.timestamp,
        )


def collate(images: list[np.ndarray], pin: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack HxWx3 uint8 images top-left into one zero-padded [B, Hmax, Wmax, 3] tensor."""
    sizes = [(im.shape[0], im.shape[1]) for im in images]
    height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
    batch = torch.zeros((len(images), height, width, 3), dtype=torch.uint8, pin_memory=pin)
    for i, image in enumerate(images):
        batch[i, : image.shape[0], : image.shape[1]] = torch.from_numpy(image)
    return batch, sizes


def resolve_classes(classes: Sequence[str] | None, categories: list[dict]) -> set[int] | None:
    """Category ids named by `--classes` (names, case-insensitive, or ids; comma-separated or repeated)."""
    if not classes:
        return None
    by_name = {str(c["name"]).casefold(): int(c["id"]) for c in categories}
    ids = {int(c["id"]) for c in categories}
    wanted: set[int] = set()
    for entry in (part.strip() for spec in classes for part in str(spec).split(",")):
        if not entry:
            continue
        if entry.casefold() in by_name:
            wanted.add(by_name[entry.casefold()])
        elif entry.lstrip("-").isdigit() and int(entry) in ids:
            wanted.add(int(entry))
        else:
            examples = ", ".join(str(c["name"]) for c in categories[:5])
            raise UsageError(f"--classes: {entry!r} is neither a category name nor an id of this model "
                             f"(names are like: {examples}...)")
    if not wanted:
        raise UsageError("--classes names no category")
    return wanted


def batches(decoded: Iterable, size: int) -> Iterator[list[Decoded] | InputDone | Decoded]:
    """Group good images and frames into batches of `size`, in order; failures and `InputDone`
    markers come through alone, after the batch before them, so events never overtake results."""
    pending: list[Decoded] = []
    for item in decoded:
        if isinstance(item, Decoded) and item.error is None:
            pending.append(item)
            if len(pending) == size:
                yield pending
                pending = []
            continue
        if pending:
            yield pending
            pending = []
        yield item
    if pending:
        yield pending


@dataclass
class OutputPlan:
    """Where and how results go, decided from the options before any work."""

    format: str
    out: Path | None  # None: stdout
    per_image: bool  # one file per image under the folder `out`
    polygons: bool  # records carry polygons (polygon formats, or --masks polygon)
    state_dir: Path | None  # resume manifest, journal and lock; None for stdout


def plan_output(options: PredictOptions) -> OutputPlan:
    """Validate --out/--format/--masks and infer the format: jsonl on stdout; from the extension of
    a file (.json coco, .jsonl/.ndjson jsonl, .geojson geojson); labelme for a folder."""
    to_stdout = options.out in (None, "-")
    out = None if to_stdout else Path(options.out)
    names_folder = out is not None and (out.is_dir() or str(options.out).endswith(("/", os.sep)))
    fmt = options.format
    if fmt is None:
        if out is None:
            fmt = "jsonl"
        elif names_folder:
            fmt = "labelme"
        elif out.suffix.lower() in _SUFFIX_FORMATS:
            fmt = _SUFFIX_FORMATS[out.suffix.lower()]
        else:
            raise UsageError(f"cannot tell the output format from --out {options.out!r}; pass --format "
                             f"({', '.join(FORMATS)}) or end a folder name with /")
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if options.masks not in MASK_ENCODINGS:
        raise UsageError(f"--masks {options.masks!r}: choose rle or polygon")
    if options.poly_tolerance < 0:
        raise UsageError(f"--poly-tolerance must be >= 0 pixels, got {options.poly_tolerance}")
    if options.vid_stride < 1:
        raise UsageError(f"--vid-stride must be at least 1, got {options.vid_stride}")
    per_image = fmt in PER_IMAGE_FORMATS
    if per_image:
        if out is None:
            raise UsageError(f"--format {fmt} writes one file per image: give a folder as --out")
        if (out.exists() and not out.is_dir()) or (not out.exists() and out.suffix.lower() in _SUFFIX_FORMATS):
            raise UsageError(f"--format {fmt} writes one file per image: --out {options.out!r} is a file, give a folder")
    elif out is not None and out.is_dir():
        raise UsageError(f"--out {options.out!r} is a folder; give a file name such as preds.json for --format {fmt}")
    if options.overlay is not None and Path(options.overlay).exists() and not Path(options.overlay).is_dir():
        raise UsageError(f"--overlay {options.overlay!r} is a file; give a folder")
    if options.resume and out is None:
        raise UsageError("--resume needs --out: a run that writes to stdout has nothing to resume")
    polygons = fmt in ("geojson", "labelme", "yolo") or (options.masks == "polygon" and fmt in ONE_FILE_FORMATS)
    state_dir = None if out is None else state_dir_for(out, per_image)
    return OutputPlan(fmt, out, per_image, polygons, state_dir)


def run_predict(options: PredictOptions, stdin: TextIO | None = None, stderr: TextIO | None = None) -> PredictSummary:
    """Run the whole prediction; raises SegcliError for user errors before any output is written."""
    stderr = stderr or sys.stderr
    if options.batch_size is not None and options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.batch_size is not None and options.batch_size > MAX_BATCH:
        raise UsageError(f"--batch-size must be at most {MAX_BATCH}, got {options.batch_size}")
    if options.workers is not None and options.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {options.workers}")
    if options.rank is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from segcli.predict.torchrun import run_ranks  # each rank runs this with its own slice

        return run_ranks(options, stdin, stderr)
    plan = plan_output(options)
    slicing = SliceSettings.of(options)
    if options.track is not None:
        options.track.validate(options.score_thr)
    if options.review is not None:
        check_review_path(options.review)
    ignored: Counter[str] = Counter()
    items = expand_sources(options.sources, stdin=stdin, ignored=ignored)
    stems = output_stems(items)
    _refuse_overwrites(options, plan, items, stems)
    keys = [json.dumps([os.path.realpath(item.path), item.file_name, stem], ensure_ascii=False)
            for item, stem in zip(items, stems)]
    # Names are given over the whole list first, so that every shard names its inputs as one run would.
    shard = ShardRun.of(options, plan, [item.file_name for item in items], stems)
    if shard is not None:
        plan, items, stems, keys = shard.plan, shard.span.take(items), shard.span.take(stems), shard.span.take(keys)
    created = first_missing(plan.state_dir) if plan.state_dir is not None else None
    if shard is not None and created is not None:
        created = plan.state_dir  # shards share the folders above it: another may be writing there
    show_progress = (stderr.isatty() and not options.quiet) if options.progress is None else options.progress
    with contextlib.ExitStack() as stack:
        journal = _open_journal(plan, options, stack)  # takes the lock: a second run stops here, at once
        if shard is not None:
            shard.begin()
        if journal is not None and options.resume:
            journal.keep_only(dict(zip(keys, (item.path for item in items))))
        todo = [i for i in range(len(items)) if journal is None or not journal.is_done(keys[i])]
        try:
            if options.ray is not None:
                from segcli.predict.ray import driver_model, run_on_ray

                predictor = driver_model(options, show_progress)  # Ray importable, the model loads here
            else:
                predictor = Predictor.load(options.weights, options.arch, options.device, options.precision,
                                           model_threshold(options), options.max_det, progress=show_progress,
                                           classes=options.classes)
        except BaseException:
            if created is not None:  # a run that never started leaves no empty state folder behind
                shutil.rmtree(created, ignore_errors=True)
            raise
        if options.ray is not None:  # the actors slice with the same settings (ray_predict.ActorSettings)
            summary = run_on_ray(options, plan, predictor, items, stems, keys, todo, journal, stderr, show_progress)
        else:
            predictor.masks_above = masks_above(options)
            if slicing is not None:  # candidates below --score-thr are merged apart (SlicedPredictor.keep_thr)
                predictor = SlicedPredictor(predictor, slicing, options.max_det, options.batch_size,
                                            keep_thr=options.score_thr)
            run = _Run(options, plan, predictor, items, stems, keys, todo, journal, stderr, show_progress)
            summary = run.go()
        summary.reused = len(items) - len(todo)
        summary.ignored = ignored
        if shard is not None:
            shard.finish(journal, keys, fingerprint(options, plan))
        return summary


def _open_journal(plan: OutputPlan, options: PredictOptions, stack: contextlib.ExitStack) -> Journal | None:
    if plan.state_dir is not None:
        return stack.enter_context(Journal(plan.state_dir, fingerprint(options, plan), options.resume,
                                           output_root=plan.out if plan.per_image else None))
    if plan.format == "jsonl":
        return None  # lines go straight to stdout
    # One-file formats on stdout: results are kept in a private journal and printed at the end,
    # so a failed run never prints half a JSON document.
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="segcli-")))
    return stack.enter_context(Journal(folder, {}, resume=False))


def fingerprint(options: PredictOptions, plan: OutputPlan) -> dict:
    """Everything that changes what a run writes; --resume refuses an output made with another."""
    from segcli.device import resolve_device, resolve_precision

    try:
        precision = resolve_precision(options.precision, resolve_device(options.device))
    except Exception:  # reported properly by Predictor.load
        precision = options.precision
    settings = {
        "weights": _weights_identity(options.weights),
        "arch": options.arch,
        "precision": str(precision),
        "format": plan.format,
        "masks": options.masks if not plan.per_image else None,
        "poly_tolerance": options.poly_tolerance if plan.polygons else None,
        "score_thr": options.score_thr,
        "max_det": options.max_det,
        "classes": sorted(str(c).strip().casefold() for spec in options.classes or [] for c in str(spec).split(",") if c.strip()),
        "vid_stride": options.vid_stride,
        "overlay": os.path.abspath(options.overlay) if options.overlay else None,
        "slice": None if (slicing := SliceSettings.of(options)) is None else slicing.fingerprint(),
    }
    # Only when on, so that outputs made before these options existed still resume.
    if options.track is not None:
        settings["track"] = options.track.fingerprint()
    if options.review is not None:
        settings["review"] = options.review.fingerprint()
    return settings


def _weights_identity(spec: str) -> str:
    """A local checkpoint by its content (a retrained file at the same path is another model);
    a registry name or URL by name (registry files are checksum-verified)."""
    path = Path(spec)
    if not path.is_file():
        return spec
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class _Run:
    """One prediction run over `todo`; results to the journal, per-image writers and overlays."""

    def __init__(self, options: PredictOptions, plan: OutputPlan, predictor: Predictor, items: list[InputItem],
                 stems: list[str], keys: list[str], todo: list[int], journal: Journal | None, stderr: TextIO,
                 show_progress: bool) -> None:
        self.options, self.plan, self.predictor = options, plan, predictor
        self.items, self.stems, self.keys, self.todo = items, stems, keys, todo
        self.journal, self.stderr, self.show_progress = journal, stderr, show_progress
        self.summary = PredictSummary()
        categories = predictor.checkpoint.categories
        self.category_names = {int(c["id"]): str(c["name"]) for c in categories}
        self.per_image = None
        if plan.per_image:
            plan.out.mkdir(parents=True, exist_ok=True)
            self.per_image = {"labelme": lambda: LabelMeWriter(plan.out), "yolo": lambda: YoloWriter(plan.out, categories),
                              "png": lambda: PngWriter(plan.out, categories)}[plan.format]()
        self.overlay = OverlayWriter(Path(options.overlay)) if options.overlay else None
        # GeoJSON of georeferenced TIFFs is written in their own CRS (segcli.writers.geojson).
        self.georef = GeoReader(self.warn) if plan.format == "geojson" else None
        self.stdout_lines = JsonlWriter(sys.stdout.buffer) if plan.out is None and plan.format == "jsonl" else None
        self.signatures = {i: Signature.of(items[i].path) for i in todo}
        self.files: dict[int, list[str]] = {}  # per-image outputs of the video in progress
        self.tracks = VideoTracks(options.track, options.score_thr) if options.track is not None else None
        self.review = None
        if options.review is not None:
            reused = set(keys) - {keys[i] for i in todo}
            self.review = ReviewQueue(options.review, options.score_thr, plan.state_dir, options.resume, reused)
            self.predictor = self.review.predictor_for_run(predictor)  # --review-flip: mirror images too
            if self.review.missing:
                self.warn(f"--review: {self.review.missing} inputs done by the earlier run have no review rows "
                          f"(its review store is gone); run without --resume to review them")
        self.info = {
            "description": "segcli predictions",
            "version": __version__,
            "weights": options.weights,
            "arch": predictor.checkpoint.arch,
            "score_thr": options.score_thr,
            "max_det": options.max_det,
        }

    def warn(self, message: str, always: bool = False) -> None:
        """One `warning:` line (odd characters of file names escaped); `always`: also with --quiet,
        for failed inputs, since the exit code (1) then says that something is wrong."""
        if always or not self.options.quiet:
            print(f"warning: {escaped(message)}", file=self.stderr)

    def go(self) -> PredictSummary:
        started = time.perf_counter()
        options = self.options
        batch_size = options.batch_size or (8 if self.predictor.device.type == "cuda" else 1)
        workers = options.workers if options.workers is not None else (1 if (os.cpu_count() or 1) <= 2 else 2)
        finished = 0
        with Progress(len(self.todo), enabled=self.show_progress, stream=self.stderr) as progress:
            decoded = iter_decoded([self.items[i] for i in self.todo], workers=workers,
                                   prefetch=max(8, 2 * batch_size), vid_stride=options.vid_stride)
            try:
                for event in batches(decoded, batch_size):
                    if isinstance(event, list):
                        for frame, result in zip(event, self.predictor.predict(event)):
                            finished += self._result(self.todo[frame.index], frame, result)
                    elif isinstance(event, InputDone):
                        finished += self._video_done(self.todo[event.index], event)
                    else:
                        finished += self._failed(self.todo[event.index], event.error)
                    progress.update(finished)
            except KeyboardInterrupt:
                # What is done so far becomes a valid output; unfinished overlay videos are dropped.
                if self.overlay is not None:
                    self.overlay.abort()
                self._assemble()
                raise
            except BrokenPipeError:  # the reader of stdout left (`| head`): no half-written overlay videos
                if self.overlay is not None:
                    self.overlay.abort()
                raise
            finally:
                decoded.close()
        self._assemble()
        self.summary.seconds = time.perf_counter() - started
        return self.summary

    def _result(self, index: int, decoded: Decoded, result: ImagePrediction) -> int:
        """Handle one image or frame result; returns 1 when that completed an input."""
        item, stem = self.items[index], self.stems[index]
        found = result  # with --track or --review, also the detections below --score-thr (engine.candidates)
        if self.tracks is not None or self.review is not None:
            result = above(found, self.options.score_thr)
        geo = self.georef.read(item.path, result.width, result.height) if self.georef and result.frame is None else None
        record = build_record(item.file_name, result.frame, result.timestamp, result.width, result.height,
                              result.boxes, result.scores, result.category_ids, result.rles, self.category_names,
                              self.options.poly_tolerance if self.plan.polygons else None,
                              pixel_centres=self.per_image is not None and self.per_image.pixel_centres,
                              geo=geo.as_record() if geo else None)
        if self.tracks is not None and result.frame is not None:
            add_track_ids(record, self.tracks.assign(index, found.frame, found.boxes, found.scores,
                                                     found.category_ids, found.rles))
        if self.review is not None:
            self.review.add(self.keys[index], record, found, decoded)
        files = self.files.setdefault(index, [])
        if self.per_image is not None:
            files += _absolute(self.plan.out, self.per_image.write(Target(record, frame_stem(stem, result.frame), item.path)))
        if self.overlay is not None:
            if result.frame is None:
                files += _absolute(self.overlay.out, self.overlay.write_image(stem, decoded.image, record))
            else:
                self.overlay.add_frame(stem, decoded.image, record, decoded.fps or 0.0)
        if self.stdout_lines is not None:
            self.stdout_lines.add_record(record)
        if self.journal is not None and not self.plan.per_image:
            self.journal.add_records(self.keys[index], [record])
        self.summary.detections += len(record["instances"])
        if self.summary.first_result_at is None:
            self.summary.first_result_at = time.perf_counter()
        if result.frame is not None:
            self.summary.frames += 1
            return 0
        self.summary.images += 1
        self._done(index)
        return 1

    def _video_done(self, index: int, event: InputDone) -> int:
        if self.tracks is not None:
            self.tracks.finish(index)
        if event.note:
            self.summary.notes.append((str(self.items[index].path), event.note))
            self.warn(f"{self.items[index].path}: {event.note}")
        if self.overlay is not None:
            self.files.setdefault(index, []).extend(_absolute(self.overlay.out, self.overlay.finish_video(self.stems[index])))
        self._done(index)
        return 1

    def _done(self, index: int) -> None:
        files = self.files.pop(index, [])
        if self.review is not None:
            self.review.input_done(self.keys[index])  # before the journal's mark, so --resume finds its rows
        signature = self.signatures.get(index)
        if self.journal is not None and signature is not None:
            self.journal.done(self.keys[index], signature, files)

    def _failed(self, index: int, reason: str) -> int:
        path = str(self.items[index].path)
        self.summary.failures.append((path, reason))
        self.warn(f"skipped {path}: {reason}", always=True)
        self.files.pop(index, None)
        if self.tracks is not None:
            self.tracks.finish(index)
        if self.review is not None:
            self.review.forget(self.keys[index])
        if self.journal is not None:
            self.journal.forget_pending(self.keys[index])
        return 1

    def _assemble(self) -> None:
        """Write the one-file output from the journal: every done input, in input order."""
        if self.review is not None:
            self.review.write(self.keys)
        plan = self.plan
        if plan.per_image or self.journal is None:
            return
        def done_records():
            return (record for key in self.keys if self.journal.is_done(key) for record in self.journal.records(key))

        records = done_records()
        if plan.format in ("coco", "coco-results"):
            target = plan.out if plan.out is not None else Path(self.journal.dir) / "out.json"
            writer = CocoWriter(target, self.predictor.checkpoint.categories,
                                results_only=plan.format == "coco-results", info=self.info)
            with writer:
                for record in records:
                    writer.add_record(record, polygons=self.options.masks == "polygon")
            if plan.out is None:
                _copy_to_stdout(target)
            return
        with (atomic_write(plan.out, "wb") if plan.out is not None else _stdout_bytes()) as handle:
            if plan.format == "jsonl":
                for record in records:
                    handle.write(record_line(record))
            else:
                write_geojson(handle, done_records, self.info, self.warn)


def _absolute(root: Path, relative: list[str]) -> list[str]:
    """Journal entries name written files absolutely: outputs and overlays live in different folders."""
    return [os.path.abspath(root / name) for name in relative]


def _refuse_overwrites(options: PredictOptions, plan: OutputPlan, items: list[InputItem], stems: list[str]) -> None:
    """Stop before any work if an output would replace an input (`--out a.jpg`, an overlay of
    `photos/a.jpg` into `photos/`, a per-image file named like an input) or another output."""
    inputs = [("the input", item.path) for item in items]
    inputs += file_inputs("the SOURCE", options.sources) + file_inputs("--weights", [options.weights])
    outputs, files = [], []
    if plan.out is not None:
        outputs.append(Output("--out", plan.out, folder=plan.per_image))
    if plan.per_image:
        suffixes = {"labelme": (LabelMeWriter.suffix,), "yolo": (YoloWriter.suffix,), "png": PngWriter.suffixes}[plan.format]
        files = [Output("--out", plan.out / (stem + suffix), given=options.out)
                 for item, stem in zip(items, stems) if not item.is_video for suffix in suffixes]
        if plan.format == "yolo":
            files.append(Output("--out", plan.out / "data.yaml", given=options.out))
    if options.review is not None:
        outputs.append(Output("--review", Path(options.review.path)))
    if options.overlay is not None:
        root = Path(options.overlay)
        outputs.append(Output("--overlay", root, folder=True))
        files += [Output("--overlay", root / (stem + suffix), given=options.overlay) for item, stem in zip(items, stems)
                  for suffix in ((".mp4", ".avi") if item.is_video else (".jpg",))]
    refuse_overwrites(inputs, outputs, files)


@contextlib.contextmanager
def _stdout_bytes():
    yield sys.stdout.buffer
    sys.stdout.buffer.flush()


def _copy_to_stdout(path: Path) -> None:
    with open(path, "rb") as source:
        shutil.copyfileobj(source, sys.stdout.buffer, 1 << 20)
    sys.stdout.buffer.flush()
