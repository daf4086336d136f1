"""Run an exported model (ONNX or TorchScript) where segcli runs its eager MaskRCNN.

`load_exported(path)` returns an `ExportedModel` and a `Checkpoint` built from the file's metadata.
The model behaves like MaskRCNN for the Predictor: `model(images uint8 [B, H, W, 3], sizes)` gives
`segcli.model.maskrcnn.Detections` (28x28 mask probabilities with boxes, as eager), and
`padded_input_size(h, w)` groups images the same way.

The file is exported with a low score threshold (0.05 by default, in its metadata); `configure`
sets the user's `--score-thr`, `--max-det` and class restriction, applied to the outputs. Because
a box can only be suppressed by a higher-scoring box, filtering afterwards keeps exactly the
detections the eager model keeps when it applies the threshold before NMS.

Files exported with a fixed batch or image size get their inputs fitted here: images are placed
top-left in the fixed canvas (the graph ignores what lies outside each image's size), larger
images are scaled down to fit and their boxes scaled back up, and short batches are padded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from segcli.errors import UsageError, WeightsError
from segcli.model.maskrcnn import Detections
from segcli.model.preprocess import ResizePolicy, padded_size
from segcli.weights import Checkpoint

ONNX_SUFFIXES = (".onnx",)


def exported_format(weights: str) -> str | None:
    """'onnx' or 'torchscript' when `weights` names a file written by `segcli export`, else None."""
    path = Path(weights).expanduser()
    if not path.is_file():
        return None
    if path.suffix.lower() in ONNX_SUFFIXES:
        return "onnx"
    from segcli.export.torchscript import is_torchscript_export

    return "torchscript" if is_torchscript_export(path) else None


def fit_image(image: Tensor, max_height: int, max_width: int) -> tuple[Tensor, float]:
    """An [H, W, 3] uint8 image scaled down (aspect kept) to fit max_height x max_width, and the
    factor that maps its pixels back to the original's (1.0 when it already fits)."""
    height, width = image.shape[:2]
    if height <= max_height and width <= max_width:
        return image, 1.0
    scale = min(max_height / height, max_width / width)
    new_h, new_w = max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
    resized = F.interpolate(image.permute(2, 0, 1)[None].float(), size=(new_h, new_w), mode="bilinear",
                            align_corners=False, antialias=True)
    return resized[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0), width / new_w


class ExportedModel:
    """An exported Mask R-CNN, called like the eager MaskRCNN."""

    def __init__(self, run, metadata: dict, path: Path) -> None:
        self.run = run
        self.metadata = metadata
        self.path = path
        self.resize = ResizePolicy(int(metadata["min_size"]), int(metadata["max_size"]))
        self.fixed_batch = metadata.get("batch")
        self.fixed_size = tuple(metadata["image_size"]) if metadata.get("image_size") else None
        self.score_threshold = float(metadata["score_threshold"])
        self.max_detections = int(metadata["max_detections"])
        self.allowed_labels: Tensor | None = None
        self.precision = "fp32"

    def configure(self, score_thr: float | None = None, max_det: int | None = None,
                  allowed_labels: list[bool] | None = None) -> None:
        """Output filters: keep scores above `score_thr`, the best `max_det` per image, and labels
        whose flag is set (index = model label, 0 = background), as MaskRCNN's settings do."""
        exported = self.metadata
        if score_thr is not None:
            if score_thr < exported["score_threshold"]:
                raise UsageError(f"--score-thr {score_thr} is below the threshold {exported['score_threshold']} that "
                                 f"{self.path.name} was exported with; re-export with `segcli export --score-thr`")
            self.score_threshold = float(score_thr)
        if max_det is not None:
            if max_det > exported["max_detections"]:
                raise UsageError(f"--max-det {max_det} is above the {exported['max_detections']} detections per image "
                                 f"that {self.path.name} keeps; re-export with `segcli export --max-det`")
            self.max_detections = int(max_det)
        if allowed_labels is not None:
            self.allowed_labels = torch.tensor(allowed_labels, dtype=torch.bool)

    def padded_input_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input size of an image of this size when it runs alone (as MaskRCNN's)."""
        if self.fixed_size is not None:  # every image runs in the same canvas, so one group
            return self.fixed_size
        return padded_size(*self.resize.output_size(height, width))

    def __call__(self, images: Tensor, sizes: list[tuple[int, int]]) -> Detections:
        images = images.cpu()
        images, fitted_sizes, scales = self._fit(images, list(sizes))
        outputs = [self._run_chunk(images[start:start + self._chunk(len(sizes))],
                                   fitted_sizes[start:start + self._chunk(len(sizes))], start)
                   for start in range(0, len(sizes), self._chunk(len(sizes)))]
        boxes, scores, labels, masks, index = (torch.cat(parts) for parts in zip(*outputs))
        boxes = boxes * torch.tensor(scales, dtype=torch.float32)[index][:, None]
        keep = self._filter(scores, labels, index)
        return Detections(boxes=boxes[keep], scores=scores[keep], labels=labels[keep], mask_probs=masks[keep],
                          image_index=index[keep], image_sizes=[tuple(s) for s in sizes])

    def _chunk(self, count: int) -> int:
        return self.fixed_batch or count

    def _fit(self, images: Tensor, sizes: list[tuple[int, int]]) -> tuple[Tensor, list[tuple[int, int]], list[float]]:
        """Images in the fixed canvas (if any), their sizes there, and the factors back to the originals."""
        if self.fixed_size is None:
            return images, sizes, [1.0] * len(sizes)
        canvas = torch.zeros((len(sizes), *self.fixed_size, 3), dtype=torch.uint8)
        fitted, scales = [], []
        for i, (h, w) in enumerate(sizes):
            image, scale = fit_image(images[i, :h, :w], *self.fixed_size)
            canvas[i, : image.shape[0], : image.shape[1]] = image
            fitted.append((image.shape[0], image.shape[1]))
            scales.append(scale)
        return canvas, fitted, scales

    def _run_chunk(self, images: Tensor, sizes: list[tuple[int, int]], offset: int) -> tuple[Tensor, ...]:
        count = len(sizes)
        if self.fixed_batch and count < self.fixed_batch:  # pad with copies of the first image, dropped below
            extra = self.fixed_batch - count
            images = torch.cat([images, images[:1].expand(extra, -1, -1, -1)])
            sizes = sizes + [sizes[0]] * extra
        boxes, scores, labels, masks, index = self.run(images.contiguous(), torch.tensor(sizes, dtype=torch.int64))
        real = index < count
        return boxes[real], scores[real], labels[real].long(), masks[real], index[real].long() + offset

    def _filter(self, scores: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        keep = scores > self.score_threshold
        if self.allowed_labels is not None:
            keep &= self.allowed_labels[labels]
        # Rank within each image among the kept rows (rows are grouped by image, best first).
        kept = keep.long()
        before = torch.cumsum(kept, 0) - kept  # kept rows before this one, over all images
        rank = before - before[torch.searchsorted(index, index)]  # ... minus those of earlier images
        return keep & (rank < self.max_detections)


def load_exported(weights: str, device: str = "auto", precision: str = "auto",
                  threads: int | None = None) -> tuple[ExportedModel, Checkpoint]:
    """The model and a Checkpoint carrying the file's categories and settings (no state dict).

    Exported models run in float32 on the CPU (ONNX Runtime's CPU provider, or TorchScript traced
    on the CPU): `device` must be auto or cpu and `precision` auto or fp32."""
    path = Path(weights).expanduser()
    kind = exported_format(weights)
    if kind is None:
        raise WeightsError(f"{path} is not a file written by `segcli export` (.onnx or TorchScript)")
    if device not in ("auto", "cpu"):
        raise UsageError(f"--device {device}: exported models run on the CPU; use --device cpu, or the .pt checkpoint")
    if kind == "onnx":
        from segcli.export.onnx import load_onnx

        run, metadata = load_onnx(path, threads)
    else:
        from segcli.export.torchscript import load_torchscript

        run, metadata = load_torchscript(path)
    stored = metadata.get("precision", "fp32")
    if precision not in ("auto", stored):
        if stored == "int8":
            raise UsageError(f"--precision {precision}: {path.name} is an int8 model (segcli quantize); use "
                             "--precision auto or int8 with it, or the weights it was made from")
        if precision == "int8":
            raise UsageError(f"--precision int8: {path.name} is a float32 export; make an int8 model with "
                             f"`segcli quantize --weights W --images DIR --out model-int8.pt`")
        raise UsageError(f"--precision {precision}: exported models run in fp32; use the .pt checkpoint for {precision}")
    if stored == "int8":
        check_int8_file(path, metadata)
    meta = {"file": str(path), "exported": kind, **{k: metadata[k] for k in ("score_threshold", "max_detections")}}
    checkpoint = Checkpoint(state_dict={}, arch=metadata["arch"], categories=list(metadata["categories"]),
                            label_to_category_id=list(metadata["label_to_category_id"]), meta=meta, source=weights)
    exported = ExportedModel(run, metadata, path)
    exported.precision = stored
    return exported, checkpoint


def check_int8_file(path: Path, metadata: dict) -> None:
    """An int8 file runs only where it is faster than float32, and only as `segcli quantize` wrote it."""
    from segcli.device import refuse_slow_int8
    from segcli.export.onnx import require

    refuse_slow_int8(path.name, f"the float32 weights ({metadata.get('weights')})")
    from segcli.export.metadata import graph_digest

    if graph_digest(require("onnx", f"checking {path.name}").load(str(path))) != metadata.get("graph_sha256"):
        raise WeightsError(f"{path} does not match the checksum segcli quantize recorded in it: the file was changed "
                           "or damaged; quantize the weights again")
