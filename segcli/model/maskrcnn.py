"""Mask R-CNN: one module serving predict, train, eval and export.

forward(images) runs preprocessing, backbone + FPN, RPN, box head and mask head on the whole
batch. Masks come out as 28x28 probabilities with their boxes; `Detections.paste_masks(i)` turns
image i's into full-size masks and `Detections.mask_rles(i)` into COCO RLEs, so a caller can
encode one image at a time in bounded memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from segcli.model.preprocess import PreparedBatch, ResizePolicy, padded_size, prepare_batch
from segcli.model.roi_heads import FlatDetections, RoIHeads
from segcli.model.rpn import RegionProposalNetwork
from segcli.ops.paste_crops import paste_mask_crops
from segcli.ops.paste_masks import paste_masks_transposed
from segcli.ops.rle import encode_masks
from segcli.ops.rle_crops import crop_to_rle
from segcli.ops.roi_align import RoIPyramid

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Detections:
    """Detections of a batch in original-image coordinates, concatenated over images."""

    boxes: Tensor  # [N, 4] xyxy
    scores: Tensor  # [N], descending within each image
    labels: Tensor  # [N] model label indices
    mask_probs: Tensor  # [N, 28, 28] probabilities inside each box
    image_index: Tensor  # [N]
    image_sizes: list[tuple[int, int]]  # original (height, width) per image

    def rows(self, image: int) -> Tensor:
        return torch.nonzero(self.image_index == image).squeeze(1)

    def paste_masks(self, image: int, threshold: float = 0.5, count: int | None = None) -> Tensor:
        """Bool masks [n, W, H] of image `image`, stored transposed for RLE encoding; of its first
        `count` detections only, when given."""
        rows = self.rows(image)[:count]
        height, width = self.image_sizes[image]
        return paste_masks_transposed(self.mask_probs[rows], self.boxes[rows], height, width, threshold)

    def mask_rles(self, image: int, count: int | None = None) -> list[dict]:
        """COCO RLEs of image `image`'s masks (its first `count`). On the CPU each mask is pasted
        into the crop around its box and encoded from there (the same RLEs, tested): the image-size
        paste computes and encodes every pixel outside the box too, 2.4x the time on 640x480 photos
        with 26 masks each, more at 100 per image. On a GPU the batched full paste is the cheap part."""
        if self.mask_probs.device.type == "cuda":
            return encode_masks(self.paste_masks(image, count=count).cpu().numpy())
        rows = self.rows(image)[:count]
        height, width = self.image_sizes[image]
        crops = paste_mask_crops(self.mask_probs[rows], self.boxes[rows], height, width)
        return [crop_to_rle(crop.mask, crop.x0, crop.y0, height, width) for crop in crops]


class MaskRCNN(nn.Module):
    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads, resize: ResizePolicy) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.resize = resize
        self.precision = "fp32"
        self.pool_dtype = torch.float32  # RoIAlign's output; the heads' own dtype when they are fused

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """Mixed precision for the convolution and linear layers; box, NMS and mask arithmetic
        stays float32 because every step after a layer reads its output as float32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type, dtype=dtype)

    @torch.inference_mode()
    def forward(self, images: Tensor, sizes: list[tuple[int, int]], masks_above: float | None = None) -> Detections:
        """images: [B, Hmax, Wmax, 3] uint8 on the model's device, image i in [:h_i, :w_i].

        `masks_above`: only detections scoring above it get a mask; the others' probabilities are
        all zero. For candidates whose scores alone are read (`--review` without `--track`)."""
        batch = prepare_batch(images, sizes, self.resize)
        x = batch.tensor
        if self.is_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Host-to-device copies wait for the queue on CUDA: make them before the backbone is queued.
        resized = torch.tensor(batch.resized_sizes, device=x.device)
        with self.autocast(x.device.type):
            features = list(self.backbone(x).values())
            proposals = self.rpn(features, tuple(x.shape[-2:]), resized)
            # The last level ("pool") only feeds the RPN.
            pyramid = RoIPyramid(features[:-1], tuple(x.shape[-2:]), self.pool_dtype)
            flat = self.roi_heads.detect(pyramid, proposals.boxes, proposals.valid, resized)
            if masks_above is None:
                mask_probs = self.roi_heads.mask_probabilities(pyramid, flat)
            else:
                mask_probs = self._masks_above(pyramid, flat, masks_above)
        return Detections(
            boxes=self.to_original(flat, batch),
            scores=flat.scores,
            labels=flat.labels,
            mask_probs=mask_probs,
            image_index=flat.image_index,
            image_sizes=batch.original_sizes,
        )

    def _masks_above(self, pyramid: RoIPyramid, flat: FlatDetections, threshold: float) -> Tensor:
        wanted = flat.scores > threshold
        chosen = FlatDetections(flat.boxes[wanted], flat.scores[wanted], flat.labels[wanted], flat.image_index[wanted])
        probs = self.roi_heads.mask_probabilities(pyramid, chosen)
        mask_probs = probs.new_zeros((flat.boxes.shape[0], *probs.shape[1:]))
        mask_probs[wanted] = probs
        return mask_probs

    def padded_input_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input size of an image of this size when it runs alone."""
        return padded_size(*self.resize.output_size(height, width))

    @staticmethod
    def to_original(flat: FlatDetections, batch: PreparedBatch) -> Tensor:
        """Scale boxes from resized to original coordinates (torchvision's float32 ratios)."""
        original = torch.tensor(batch.original_sizes, dtype=torch.float32, device=flat.boxes.device)
        resized = torch.tensor(batch.resized_sizes, dtype=torch.float32, device=flat.boxes.device)
        ratio = (original / resized)[flat.image_index]  # [N, (h, w)]
        return flat.boxes * ratio[:, [1, 0, 1, 0]]

    @property
    def is_channels_last(self) -> bool:
        weight = self.backbone.body.conv1.weight
        return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
