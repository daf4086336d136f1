"""`segcli predict`: sources -> decoded images -> batches on the device -> detections -> COCO file.

Decoding runs in background threads (segcli.data.decode) while the model works; results are
encoded and handed to the writer image by image, so memory does not grow with the folder.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np
import torch

from segcli import __version__
from segcli.data.decode import Decoded, iter_decoded
from segcli.data.sources import InputItem, expand_sources
from segcli.engine.device import prepare_for_inference, resolve_device, resolve_precision
from segcli.engine.progress import Progress
from segcli.errors import UsageError
from segcli.model.build import model_from_checkpoint
from segcli.model.maskrcnn import Detections, MaskRCNN
from segcli.model.roi_heads import CUDA_CANDIDATE_CAP, DetectionSettings
from segcli.ops.rle import encode_masks
from segcli.weights import Checkpoint, resolve_weights
from segcli.writers.coco import CocoWriter

FORMATS = ("coco", "coco-results")


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
    format: str = "coco"
    workers: int | None = None  # None: 1 decoding thread on <= 2 cores (more would slow the model), else 2
    progress: bool | None = None  # None: when stderr is a terminal
    quiet: bool = False


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


@dataclass
class PredictSummary:
    images: int = 0
    detections: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


class Predictor:
    """A loaded model with its categories: uint8 images in, per-image predictions out."""

    def __init__(self, model: MaskRCNN, checkpoint: Checkpoint, device: torch.device) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.device = device
        self.label_to_category = torch.tensor(checkpoint.label_to_category_id)

    @classmethod
    def load(cls, weights: str, arch: str | None, device: str, precision: str, score_thr: float, max_det: int,
             progress: bool = True) -> Predictor:
        if not 0.0 <= score_thr <= 1.0:
            raise UsageError(f"--score-thr must be between 0 and 1, got {score_thr}")
        if max_det < 1:
            raise UsageError(f"--max-det must be at least 1, got {max_det}")
        torch_device = resolve_device(device)
        checkpoint = resolve_weights(weights, arch, progress=progress)
        # torchvision scores candidates above 0.05; a higher user threshold is applied before NMS,
        # which keeps exactly the detections torchvision would keep above it (see roi_heads).
        settings = DetectionSettings(score_threshold=max(score_thr, 0.0), max_detections=max_det,
                                     candidate_cap=CUDA_CANDIDATE_CAP if torch_device.type == "cuda" else None)
        model = model_from_checkpoint(checkpoint, settings)
        known = {c["id"] for c in checkpoint.categories}
        model.roi_heads.restrict_labels([cid in known for cid in checkpoint.label_to_category_id])
        model = prepare_for_inference(model, torch_device, resolve_precision(precision, torch_device))
        return cls(model, checkpoint, torch_device)

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
            detections = self.model(batch.to(self.device, non_blocking=True), sizes)
            for position, index in enumerate(indices):
                results[index] = self._image_result(detections, position, decoded[index].item)
        return results

    def _image_result(self, detections: Detections, index: int, item: InputItem) -> ImagePrediction:
        rows = detections.rows(index)
        height, width = detections.image_sizes[index]
        masks = detections.paste_masks(index).cpu().numpy()
        labels = detections.labels[rows].cpu()
        return ImagePrediction(
            item=item,
            width=width,
            height=height,
            boxes=detections.boxes[rows].cpu().numpy(),
            scores=detections.scores[rows].cpu().numpy(),
            category_ids=self.label_to_category[labels].numpy(),
            rles=encode_masks(masks),
        )


def collate(images: list[np.ndarray], pin: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack HxWx3 uint8 images top-left into one zero-padded [B, Hmax, Wmax, 3] tensor."""
    sizes = [(im.shape[0], im.shape[1]) for im in images]
    height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
    batch = torch.zeros((len(images), height, width, 3), dtype=torch.uint8, pin_memory=pin)
    for i, image in enumerate(images):
        batch[i, : image.shape[0], : image.shape[1]] = torch.from_numpy(image)
    return batch, sizes


def batches(decoded: Iterable[Decoded], size: int, summary: PredictSummary, warn) -> Iterator[list[Decoded]]:
    """Group good images into batches of `size`; report and count the failures on the way."""
    pending: list[Decoded] = []
    for item in decoded:
        if item.error is not None:
            summary.failures.append((str(item.item.path), item.error))
            warn(f"skipped {item.item.path}: {item.error}")
            continue
        pending.append(item)
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending


def run_predict(options: PredictOptions, stdin: TextIO | None = None, stderr: TextIO | None = None) -> PredictSummary:
    """Run the whole prediction; raises SegcliError for user errors before any output is written."""
    stderr = stderr or sys.stderr
    if options.format not in FORMATS:
        raise UsageError(f"--format {options.format!r}: choose one of {', '.join(FORMATS)}")
    if options.batch_size is not None and options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    to_stdout = options.out in (None, "-")
    if not to_stdout and Path(options.out).is_dir():
        raise UsageError(f"--out {options.out!r} is a folder; give a file name such as preds.json")
    items = expand_sources(options.sources, stdin=stdin)
    show_progress = (stderr.isatty() and not options.quiet) if options.progress is None else options.progress
    predictor = Predictor.load(options.weights, options.arch, options.device, options.precision,
                               options.score_thr, options.max_det, progress=show_progress)
    batch_size = options.batch_size or (8 if predictor.device.type == "cuda" else 1)
    info = {
        "description": "segcli predictions",
        "version": __version__,
        "weights": options.weights,
        "arch": predictor.checkpoint.arch,
        "score_thr": options.score_thr,
        "max_det": options.max_det,
    }
    # stdout gets the finished file at the end, so a failed run never prints half a JSON document.
    out_path = _stdout_spool() if to_stdout else Path(options.out)
    try:
        summary = _predict_into(out_path, items, predictor, options, info, batch_size, show_progress, stderr)
        if to_stdout:
            _copy_to_stdout(out_path)
    finally:
        if to_stdout:
            out_path.unlink(missing_ok=True)
    return summary


def _predict_into(out_path: Path, items: list[InputItem], predictor: Predictor, options: PredictOptions, info: dict,
                  batch_size: int, show_progress: bool, stderr: TextIO) -> PredictSummary:
    summary = PredictSummary()
    warn = (lambda message: None) if options.quiet else (lambda message: print(f"warning: {message}", file=stderr))
    started = time.perf_counter()
    writer = CocoWriter(out_path, predictor.checkpoint.categories,
                        results_only=options.format == "coco-results", info=info)
    with writer, Progress(len(items), enabled=show_progress, stream=stderr) as progress:
        workers = options.workers if options.workers is not None else (1 if (os.cpu_count() or 1) <= 2 else 2)
        decoded = iter_decoded(items, workers=workers, prefetch=max(8, 2 * batch_size))
        try:
            for group in batches(decoded, batch_size, summary, warn):
                for result in predictor.predict(group):
                    writer.add_image(result.item.file_name, result.width, result.height, result.boxes,
                                     result.scores, result.category_ids, result.rles)
                    summary.images += 1
                    summary.detections += len(result.scores)
                progress.update(summary.images + len(summary.failures))
        except KeyboardInterrupt:
            writer.close(partial_ok=True)  # what was predicted so far stays a valid file
            raise
        finally:
            decoded.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _stdout_spool() -> Path:
    handle = tempfile.NamedTemporaryFile(prefix="segcli-", suffix=".json", delete=False)
    handle.close()
    return Path(handle.name)


def _copy_to_stdout(path: Path) -> None:
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
