"""Mask R-CNN training losses (the paper's recipe), computed for the whole batch at once.

- RPN: anchors matched to ground truth (IoU >= 0.7 positive, < 0.3 negative, plus each box's best
  anchors), 256 sampled per image at 1:1, objectness BCE + smooth L1 on the positives' deltas.
- RoI heads: proposals plus the ground-truth boxes, matched at IoU 0.5, 512 sampled per image at 1:3,
  class cross-entropy + class-specific smooth L1 on the positives.
- Masks: per-pixel sigmoid BCE on each positive's ground-truth class, against 28x28 targets cut from
  the ground-truth masks with RoIAlign (aligned, thresholded at 0.5; only the pixels it reads).

Matching and sampling run on padded [B, N, G] tensors (random ranks instead of per-image
`randperm` loops), so the work is a few large tensor operations however many images a batch holds.
Ground-truth masks stay at their original resolution: RoIs are mapped back to original
coordinates instead of resizing every mask with the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from segcli.model.boxes import encode_boxes
from segcli.model.maskrcnn import MaskRCNN
from segcli.model.preprocess import ResizePolicy, prepare_batch
from segcli.model.roi_heads import BOX_POOL_SIZE, MASK_POOL_SIZE, ROI_BOX_WEIGHTS, SAMPLING_RATIO, own_class_logits
from segcli.model.rpn import RPN_BOX_WEIGHTS, flatten_level
from segcli.ops.roi_align import RoIPyramid, sample_masks

IGNORE, NEGATIVE, POSITIVE = -1, 0, 1
SMOOTH_L1_BETA = 1.0 / 9  # as torchvision and Detectron


@dataclass(frozen=True)
class TrainSettings:
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_positive_iou: float = 0.7
    rpn_negative_iou: float = 0.3
    rpn_pre_nms_top_n: int = 2000  # per level and image, during training
    rpn_post_nms_top_n: int = 2000  # per image, during training
    roi_batch_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_positive_iou: float = 0.5


@dataclass
class Targets:
    """Ground truth of a batch, padded to G boxes per image (label 0 marks padding).

    boxes are in original-image coordinates; masks holds every instance's full-size mask, at
    the size of its own image, padded to the batch's largest original image.
    """

    boxes: Tensor  # [B, G, 4] float32 xyxy
    labels: Tensor  # [B, G] int64, 0 = padding
    masks: Tensor  # [B, G, H, W] uint8


def box_iou_batched(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes a [B, N, 4] with boxes b [B, G, 4] -> [B, N, G]."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    top_left = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    bottom_right = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-9)


def match(iou: Tensor, gt_valid: Tensor, positive_iou: float, negative_iou: float, low_quality: bool) -> tuple[Tensor, Tensor]:
    """Per candidate: state (POSITIVE, NEGATIVE, IGNORE) and the index of its best ground truth.

    iou: [B, N, G]; padding columns (gt_valid False) never match. With `low_quality`, each ground
    truth's best candidates (ties included, IoU > 0) are positive even below `positive_iou`, so
    every object gets an anchor (Detectron's rule).
    """
    iou = torch.where(gt_valid[:, None, :], iou, torch.full_like(iou, -1.0))
    best_iou, best_gt = iou.max(dim=2) if iou.shape[2] else (iou.new_full(iou.shape[:2], -1.0), iou.new_zeros(iou.shape[:2], dtype=torch.long))
    state = torch.full_like(best_gt, IGNORE)
    state[best_iou < negative_iou] = NEGATIVE
    state[best_iou >= positive_iou] = POSITIVE
    if low_quality and iou.shape[2]:
        best_for_gt = iou.max(dim=1, keepdim=True).values  # [B, 1, G]
        is_best = ((iou == best_for_gt) & (iou > 0) & gt_valid[:, None, :]).any(dim=2)
        state[is_best] = POSITIVE
    return state, best_gt


def sample_balanced(state: Tensor, per_image: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Random positives (at most `per_image * positive_fraction`) and negatives filling up to
    `per_image`, per row of state [B, N]. Returns two bool masks [B, N]: positives, negatives."""
    positive, negative = state == POSITIVE, state == NEGATIVE
    num_pos = positive.sum(1).clamp(max=int(per_image * positive_fraction))
    num_neg = negative.sum(1).clamp(max=per_image - num_pos)
    return _random_subset(positive, num_pos), _random_subset(negative, num_neg)


def _random_subset(eligible: Tensor, count: Tensor) -> Tensor:
    """`count[b]` random True entries of each row of eligible [B, N]: a random rank per entry."""
    keys = torch.where(eligible, torch.rand(eligible.shape, device=eligible.device), torch.full(eligible.shape, 2.0, device=eligible.device))
    order = keys.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return eligible & (rank < count[:, None])


def smooth_l1_sum(input: Tensor, target: Tensor) -> Tensor:
    return F.smooth_l1_loss(input, target, beta=SMOOTH_L1_BETA, reduction="sum")


def box_head_losses(class_logits: Tensor, box_deltas: Tensor, labels: Tensor, target_deltas: Tensor) -> tuple[Tensor, Tensor]:
    """Fast R-CNN losses of sampled RoIs whose positives come first (labels > 0 for the first
    len(target_deltas) rows): cross-entropy over all, smooth L1 on each positive's own class's
    deltas, both normalized by the number of RoIs."""
    num_rois, num_pos = max(labels.numel(), 1), target_deltas.shape[0]
    class_loss = F.cross_entropy(class_logits, labels, reduction="sum") / num_rois
    rows = torch.arange(num_pos, device=labels.device)
    positive_deltas = box_deltas[:num_pos].view(num_pos, -1, 4)[rows, labels[:num_pos]]
    return class_loss, smooth_l1_sum(positive_deltas, target_deltas) / num_rois


class TrainingModel(nn.Module):
    """Wraps a MaskRCNN so that forward returns its losses (what DistributedDataParallel wraps)."""

    def __init__(self, model: MaskRCNN, settings: TrainSettings | None = None) -> None:
        super().__init__()
        self.model = model
        self.settings = settings or TrainSettings()

    def forward(self, images: Tensor, sizes: list[tuple[int, int]], targets: Targets, resize: ResizePolicy) -> dict[str, Tensor]:
        model, s = self.model, self.settings
        batch = prepare_batch(images, sizes, resize)
        x = batch.tensor
        if model.is_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        device = x.device
        original = torch.tensor(batch.original_sizes, dtype=torch.float32, device=device)
        resized_sizes = torch.tensor(batch.resized_sizes, device=device)
        scale = resized_sizes.float() / original  # [B, (h, w)] original -> resized
        gt_boxes = targets.boxes * scale[:, None, [1, 0, 1, 0]]
        gt_valid = targets.labels > 0
        padded = tuple(x.shape[-2:])
        with model.autocast(device.type):
            features = list(model.backbone(x).values())
            objectness, deltas = model.rpn.head_outputs(features)
            anchors = model.rpn.anchors(features, padded)
            losses = self.rpn_losses(objectness, deltas, anchors, gt_boxes, gt_valid)
            with torch.no_grad():
                proposals = model.rpn.propose([o.detach() for o in objectness], [d.detach() for d in deltas], anchors,
                                              resized_sizes, s.rpn_pre_nms_top_n, s.rpn_post_nms_top_n)
            pyramid = RoIPyramid(features[:-1], padded)
            losses.update(self.roi_losses(pyramid, proposals.boxes, proposals.valid, gt_boxes, gt_valid, targets, scale))
        return losses

    def rpn_losses(self, objectness: list[Tensor], deltas: list[Tensor], anchors: list[Tensor], gt_boxes: Tensor,
                   gt_valid: Tensor) -> dict[str, Tensor]:
        s = self.settings
        flat = [flatten_level(o.float(), d.float()) for o, d in zip(objectness, deltas)]
        logits = torch.cat([f[0] for f in flat], 1)  # [B, A]
        pred_deltas = torch.cat([f[1] for f in flat], 1)  # [B, A, 4]
        all_anchors = torch.cat(anchors)  # [A, 4]
        batch = logits.shape[0]
        with torch.no_grad():
            iou = box_iou_batched(all_anchors.expand(batch, -1, -1), gt_boxes)
            state, best_gt = match(iou, gt_valid, s.rpn_positive_iou, s.rpn_negative_iou, low_quality=True)
            positive, negative = sample_balanced(state, s.rpn_batch_per_image, s.rpn_positive_fraction)
            sampled = positive | negative
            num_sampled = sampled.sum().clamp(min=1)
            b, a = torch.nonzero(positive, as_tuple=True)
            target_deltas = encode_boxes(gt_boxes[b, best_gt[b, a]], all_anchors[a], RPN_BOX_WEIGHTS)
        objectness_loss = F.binary_cross_entropy_with_logits(logits[sampled], positive[sampled].float(), reduction="sum")
        box_loss = smooth_l1_sum(pred_deltas[b, a], target_deltas)
        return {"rpn_objectness": objectness_loss / num_sampled, "rpn_box": box_loss / num_sampled}

    def roi_losses(self, pyramid: RoIPyramid, proposals: Tensor, proposal_valid: Tensor, gt_boxes: Tensor,
                   gt_valid: Tensor, targets: Targets, scale: Tensor) -> dict[str, Tensor]:
        s, heads = self.settings, self.model.roi_heads
        with torch.no_grad():
            # Ground-truth boxes join the candidates, so every object has well-placed positives from the start.
            candidates = torch.cat([proposals, gt_boxes], 1)
            candidate_valid = torch.cat([proposal_valid, gt_valid], 1)
            iou = box_iou_batched(candidates, gt_boxes)
            state, best_gt = match(iou, gt_valid, s.roi_positive_iou, s.roi_positive_iou, low_quality=False)
            state = torch.where(candidate_valid, state, torch.full_like(state, IGNORE))
            positive, negative = sample_balanced(state, s.roi_batch_per_image, s.roi_positive_fraction)
            # Positives first, so the mask stage takes a prefix of the sampled rows.
            image_p, slot_p = torch.nonzero(positive, as_tuple=True)
            image_n, slot_n = torch.nonzero(negative, as_tuple=True)
            image = torch.cat([image_p, image_n])
            rois = candidates[image, torch.cat([slot_p, slot_n])]
            matched = best_gt[image_p, slot_p]
            labels = torch.cat([targets.labels[image_p, matched], torch.zeros_like(image_n)])
            target_deltas = encode_boxes(gt_boxes[image_p, matched], rois[: len(image_p)], ROI_BOX_WEIGHTS)
        num_pos = len(image_p)
        pooled = pyramid(rois, image, BOX_POOL_SIZE, SAMPLING_RATIO)
        hidden = heads.box_head(pooled)
        with torch.autocast(hidden.device.type, enabled=False):
            class_logits, box_deltas = heads.box_predictor(hidden.float())
        class_loss, box_loss = box_head_losses(class_logits, box_deltas, labels, target_deltas)
        mask_loss = self.mask_loss(pyramid, rois[:num_pos], image_p, labels[:num_pos], matched, targets, scale)
        return {"roi_class": class_loss, "roi_box": box_loss, "mask": mask_loss}

    def mask_loss(self, pyramid: RoIPyramid, rois: Tensor, image: Tensor, labels: Tensor, matched: Tensor,
                  targets: Targets, scale: Tensor) -> Tensor:
        heads = self.model.roi_heads
        if rois.shape[0] == 0:  # keep every mask parameter in the graph (DDP expects gradients for all)
            return sum(p.sum() * 0.0 for p in (*heads.mask_head.parameters(), *heads.mask_predictor.parameters()))
        size = 2 * MASK_POOL_SIZE
        with torch.no_grad():
            rois_original = rois / scale[image][:, [1, 0, 1, 0]]
            rows = image * targets.masks.shape[1] + matched  # into the [B*G, H, W] masks
            mask_targets = sample_masks(targets.masks.flatten(0, 1), rows, rois_original, size) >= 0.5
        pooled = pyramid(rois, image, MASK_POOL_SIZE, SAMPLING_RATIO)
        hidden = F.relu(heads.mask_predictor.conv5_mask(heads.mask_head(pooled)))
        logits = own_class_logits(heads.mask_predictor.mask_fcn_logits, hidden, labels)
        return F.binary_cross_entropy_with_logits(logits, mask_targets.float())
