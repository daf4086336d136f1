"""Greedy NMS over padded groups: every image, level and class of a batch in one call.

Layout: `boxes[G, K, 4]` where each group's K entries are already sorted by descending score.
Groups are (image, FPN level) for proposals and (image) with class labels for detections, so one
call covers the whole batch. The result is a keep mask of the same shape (fixed shape, so nothing
here needs to know on the host how many boxes survive).

Exactness: the IoU uses torchvision's float32 formula, and the greedy rule is the same ("keep j
unless an earlier kept box of its group and class overlaps it by more than the threshold"), so the
kept set equals `torchvision.ops.batched_nms` run per image.

Paths:
- CUDA with Triton: one kernel launch, one program per group, no host sync (`nms_triton`).
- Otherwise: the suppression matrix, then a fixed-point iteration (Cluster-NMS). Iteration t
  settles entry t, and a fixed point of the rule is unique, so stopping when nothing changes gives
  exactly the greedy result; in practice it settles in a handful of iterations. The convergence
  check is a host sync, which costs nothing on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def float32_threshold(iou_threshold: float) -> float:
    """The float32 t for which `iou > t` equals torchvision's test of a float32 IoU against a
    C++ double threshold: where rounding to float32 goes up, step one float32 down."""
    rounded = np.float32(iou_threshold)
    if float(rounded) > iou_threshold:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def pairwise_iou(boxes: Tensor) -> Tensor:
    """IoU of every pair within each group: [G, K, 4] -> [G, K, K], torchvision's float32 formula."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_(min=0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0)
    inter = w * h
    return inter / (area[:, :, None] + area[:, None, :] - inter)


def nms_padded_reference(boxes: Tensor, valid: Tensor, labels: Tensor | None, iou_threshold: float) -> Tensor:
    """Pure-torch greedy NMS over sorted padded groups; see the module docstring."""
    groups, k, _ = boxes.shape
    if k == 0:
        return valid.clone()
    # suppresses[g, i, j]: an earlier box i would suppress a later box j if i is kept.
    suppresses = pairwise_iou(boxes.float()) > float32_threshold(iou_threshold)
    suppresses &= torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu_(1)
    suppresses &= valid[:, :, None] & valid[:, None, :]
    if labels is not None:
        suppresses &= labels[:, :, None] == labels[:, None, :]
    weights = suppresses.to(torch.float32)
    keep = valid.clone()
    with torch.autocast(boxes.device.type, enabled=False):
        keep = _settle(keep, valid, weights, k)
    return keep


def _settle(keep: Tensor, valid: Tensor, weights: Tensor, k: int) -> Tensor:
    for _ in range(k):
        # bmm counts kept suppressors of each box; float32 counts are exact up to 2**24.
        hit = torch.bmm(keep.to(torch.float32)[:, None, :], weights)[:, 0, :] > 0
        new_keep = valid & ~hit
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def nms_padded(boxes: Tensor, valid: Tensor, labels: Tensor | None, iou_threshold: float) -> Tensor:
    """Keep mask [G, K] of greedy NMS over score-sorted padded groups (labels: class-aware)."""
    if boxes.is_cuda:
        from segcli.ops import nms_triton  # triton is only worth importing for CUDA tensors

        if nms_triton.AVAILABLE:
            return nms_triton.nms_padded(boxes.float(), valid, labels, iou_threshold)
    return nms_padded_reference(boxes, valid, labels, iou_threshold)
