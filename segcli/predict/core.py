"""The floor every prediction feature stands on: a loaded model that turns batches of decoded
images into per-image predictions (numpy, original-image coordinates), and the batching of the
decoded stream. It imports no feature; features (slicing, candidates, tracking, review) and
outputs (segcli.predict.sinks) build on it. See ARCHITECTURE.md for the whole flow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Collection, Iterable, Iterator, Sequence

import numpy as np
import torch

from segcli.data.decode import Decoded, InputDone
from segcli.data.sources import InputItem
from segcli.device import prepare_for_inference, resolve_device, resolve_precision
from segcli.errors import UsageError
from segcli.model.build import model_from_checkpoint
from segcli.model.maskrcnn import Detections, MaskRCNN
from segcli.model.roi_heads import CUDA_CANDIDATE_CAP, DetectionSettings
from segcli.ops.rle_crops import crop_to_rle
from segcli.weights import Checkpoint, resolve_weights


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
        # A bad flag stops before weights are fetched; int8 is checked against the file below.
        requested = precision
        if precision != "int8":
            precision = resolve_precision(precision, torch_device)
        checkpoint = resolve_weights(weights, arch, progress=progress)
        if checkpoint.int8 is not None:
            from segcli.export.quantize_native import check_int8_checkpoint

            check_int8_checkpoint(checkpoint, requested, torch_device)
        elif precision == "int8":
            resolve_precision("int8", torch_device)  # the message that says how to make an int8 model
        # torchvision scores candidates above 0.05; a higher user threshold is applied before NMS,
        # which keeps exactly the detections torchvision would keep above it (see roi_heads).
        settings = DetectionSettings(score_threshold=max(score_thr, 0.0), max_detections=max_det,
                                     candidate_cap=CUDA_CANDIDATE_CAP if torch_device.type == "cuda" else None)
        wanted = resolve_classes(classes, checkpoint.categories)
        model = model_from_checkpoint(checkpoint, settings)
        known = {c["id"] for c in checkpoint.categories} if wanted is None else wanted
        # Restricting labels before NMS and --max-det makes --classes keep the best N of those classes.
        model.roi_heads.restrict_labels([cid in known for cid in checkpoint.label_to_category_id])
        if checkpoint.int8 is not None:
            from segcli.export.quantize_native import load_int8

            model, _ = load_int8(model, checkpoint)
        else:
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
            rles = detections.mask_rles(index)
        else:  # scores descend within an image: the detections with masks come first
            masked = int((scores > np.float32(self.masks_above)).sum())
            rles = detections.mask_rles(index, count=masked)
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


def above(result: ImagePrediction, score_thr: float) -> ImagePrediction:
    """An ImagePrediction cut to the detections scoring above `score_thr` (order kept)."""
    keep = np.asarray(result.scores) > np.float32(score_thr)  # float32, as the model compares
    if keep.all():
        return result
    return dataclasses.replace(result, boxes=result.boxes[keep], scores=result.scores[keep],
                               category_ids=result.category_ids[keep],
                               rles=[rle for rle, k in zip(result.rles, keep) if k])
