"""RoI heads: proposals -> scored, class-specific boxes -> masks for the detections that are kept.

The box stage runs on every proposal of the batch at once. The score threshold is applied before
NMS and before the mask stage, so detections below `--score-thr` cost no mask work. Filtering by a
threshold above torchvision's 0.05 keeps exactly torchvision's detections above that threshold:
a box can only be suppressed by a higher-scoring box, so removing lower ones changes nothing above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from segcli.model.boxes import clip_boxes, decode_boxes, large_enough
from segcli.ops.nms import nms_padded
from segcli.ops.roi_align import RoIPyramid

ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BOX_POOL_SIZE = 7
MASK_POOL_SIZE = 14
SAMPLING_RATIO = 2


@dataclass(frozen=True)
class DetectionSettings:
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    max_detections: int = 100
    min_size: float = 1e-2
    # Candidates per image entering NMS, best first. A fixed size avoids a host sync, so CUDA runs
    # use one (`CUDA_CANDIDATE_CAP`); None (the CPU default) takes every candidate. Only matters at
    # very low thresholds with thousands of candidates.
    candidate_cap: int | None = None


CUDA_CANDIDATE_CAP = 4096
MASK_CHUNK = 16


def bucketed_count(count: int) -> int:
    """`count` rounded up to one of four sizes per octave (1-7 exact; 8, 10, 12, 14, 16, 20, ...):
    at most 25% padding, about 11% on average."""
    step = 1 << max(count.bit_length() - 3, 0)
    return -(-count // step) * step


@dataclass
class FlatDetections:
    """Detections of a batch, concatenated: row i belongs to image image_index[i]."""

    boxes: Tensor  # [N, 4] resized-image coordinates
    scores: Tensor  # [N]
    labels: Tensor  # [N] model label indices (1..num_classes-1)
    image_index: Tensor  # [N]


class RoIHeads(nn.Module):
    def __init__(
        self,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_head: nn.Module,
        mask_predictor: nn.Module,
        settings: DetectionSettings,
    ) -> None:
        super().__init__()
        # Names match torchvision's RoIHeads so checkpoints load unchanged.
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.settings = settings
        # Labels the checkpoint maps to no category (COCO's unused ids) are never reported.
        self.register_buffer("allowed_labels", None, persistent=False)

    def restrict_labels(self, allowed: list[bool]) -> None:
        """Report only labels whose flag is set (index = model label, 0 = background)."""
        self.allowed_labels = torch.tensor(allowed[1:], dtype=torch.bool, device=self.box_predictor.cls_score.weight.device)

    def detect(self, pyramid: RoIPyramid, proposals: Tensor, proposal_valid: Tensor, image_sizes: Tensor) -> FlatDetections:
        batch, num_proposals = proposals.shape[:2]
        batch_index = torch.arange(batch, device=proposals.device).repeat_interleave(num_proposals)
        pooled = pyramid(proposals.reshape(-1, 4), batch_index, BOX_POOL_SIZE, SAMPLING_RATIO)
        hidden = self.box_head(pooled)
        with torch.autocast(hidden.device.type, enabled=False):  # scores and deltas in float32
            class_logits, box_deltas = self.box_predictor(hidden.float())
        num_classes = class_logits.shape[-1]
        boxes = decode_boxes(box_deltas, proposals.reshape(-1, 4), ROI_BOX_WEIGHTS)
        boxes = clip_boxes(boxes.view(batch, -1, num_classes, 4), image_sizes)[:, :, 1:]  # drop background
        scores = torch.softmax(class_logits, -1).view(batch, -1, num_classes)[:, :, 1:]
        labels = torch.arange(1, num_classes, device=boxes.device).expand(num_proposals, -1)
        # Candidates in torchvision's order: proposal-major, class-minor.
        boxes, scores, labels = boxes.reshape(batch, -1, 4), scores.reshape(batch, -1), labels.reshape(-1)
        s = self.settings
        candidate = (scores > s.score_threshold) & large_enough(boxes, s.min_size)
        candidate &= proposal_valid.repeat_interleave(num_classes - 1, dim=1)
        if self.allowed_labels is not None:
            candidate &= self.allowed_labels.repeat(num_proposals)[None, :]
        scores = torch.where(candidate, scores, torch.full_like(scores, -1.0))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        if s.candidate_cap is not None:
            count = min(s.candidate_cap, order.shape[1])
        else:
            count = int(candidate.sum(1).max())  # exact, at the price of a host read
        order = order[:, :count]
        sorted_scores = scores.gather(1, order)
        sorted_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        sorted_labels = labels[order]
        keep = nms_padded(sorted_boxes, sorted_scores > s.score_threshold, sorted_labels, s.nms_threshold)
        keep &= torch.cumsum(keep, dim=1) <= s.max_detections
        # Compacting to the kept detections is the one host sync of the forward pass: the mask
        # stage's size depends on how many survive, and running it on padding would waste the
        # work that the score threshold saves.
        rows, cols = torch.nonzero(keep, as_tuple=True)
        return FlatDetections(
            boxes=sorted_boxes[rows, cols], scores=sorted_scores[rows, cols], labels=sorted_labels[rows, cols], image_index=rows
        )

    def mask_probabilities(self, pyramid: RoIPyramid, detections: FlatDetections) -> Tensor:
        """Sigmoid mask [N, 28, 28] of each detection for its own class."""
        count = detections.boxes.shape[0]
        if count == 0:
            return detections.boxes.new_zeros((0, 2 * MASK_POOL_SIZE, 2 * MASK_POOL_SIZE))
        # On the CPU the mask head runs on at most MASK_CHUNK detections at a time. Its activations
        # grow with the count (28x28x256 floats, 800 KB per detection), and glibc serves blocks of
        # varying size in the tens of MB from its heap, where they fragment it: on long videos RSS
        # stepped up by 65-105 MB in about half the runs (benchmarks/stream_memory.py). Chunks
        # keep every block of this stage the same few sizes, frame after frame. CUDA's caching
        # allocator has no such problem, and there one pass saves kernel launches.
        step = MASK_CHUNK if detections.boxes.device.type == "cpu" else count
        chunks = [
            self._own_class_masks(pyramid, detections.boxes[start:start + step],
                                  detections.image_index[start:start + step], detections.labels[start:start + step])
            for start in range(0, count, step)
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _own_class_masks(self, pyramid: RoIPyramid, boxes: Tensor, image_index: Tensor, labels: Tensor) -> Tensor:
        pooled = pyramid(boxes, image_index, MASK_POOL_SIZE, SAMPLING_RATIO)
        count = pooled.shape[0]
        # Zero rows up to a bucketed count: the convolutions then see few batch sizes (12 within
        # a CPU chunk, 23 for up to 100 detections in CUDA's one pass) instead of every count.
        # oneDNN compiles and caches primitives per shape (up to 1024 of them), so one set per
        # count filled that cache on long videos.
        pooled = F.pad(pooled, (0, 0, 0, 0, 0, 0, 0, bucketed_count(count) - count))
        hidden = F.relu(self.mask_predictor.conv5_mask(self.mask_head(pooled)))[:count]
        return torch.sigmoid(own_class_logits(self.mask_predictor.mask_fcn_logits, hidden, labels))


def own_class_logits(logits_layer: nn.Conv2d, hidden: Tensor, labels: Tensor) -> Tensor:
    """Float32 mask logits [N, H, W] of each RoI's own class from the mask head's [N, C, H, W].

    Equal to running the 1x1 `logits_layer` and picking channel `labels[i]` of row i, without the
    other num_classes - 1 maps: 91x less work and memory for COCO."""
    with torch.autocast(hidden.device.type, enabled=False):
        weight = logits_layer.weight[labels].flatten(1).float()  # [N, C]
        bias = logits_layer.bias[labels].float()
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _OwnClassProduct.apply(hidden.float(), weight) + bias[:, None, None]
        return torch.einsum("nchw,nc->nhw", hidden.float(), weight) + bias[:, None, None]


class _OwnClassProduct(torch.autograd.Function):
    """einsum("nchw,nc->nhw") for training. einsum's gradient for the features is a batched
    outer product, which bmm runs slowly on the CPU (30 ms of a bf16 step for 83 RoIs); here it is
    an elementwise product in the features' channels-last layout (forward and backward for 115
    RoIs: 8 ms instead of 14)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor) -> Tensor:
        n, c, h, w = hidden.shape
        pixels = hidden.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view when channels-last
        ctx.save_for_backward(pixels, weight)
        ctx.size = (n, c, h, w)
        return torch.bmm(pixels, weight[:, :, None]).view(n, h, w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        pixels, weight = ctx.saved_tensors
        n, c, h, w = ctx.size
        grad = grad.reshape(n, h * w, 1)
        grad_hidden = (grad * weight[:, None, :]).view(n, h, w, c).permute(0, 3, 1, 2)
        return grad_hidden, (pixels * grad).sum(1)
