"""NMS over padded groups in a form each export format can carry, with eager's exact semantics.

Eager segcli runs torchvision's C++ NMS once per (group, class) in a Python loop
(`segcli.ops.nms.nms_padded_per_group`), which tracing would unroll for the traced batch only.

- TorchScript: the same loop as a scripted function. A traced module that calls a scripted
  function keeps its control flow, so the loop runs over whatever batch comes in.
- ONNX: the standard `NonMaxSuppression` operator, which takes a batch of groups and classes
  natively (boxes [G, K, 4], scores [G, C, K]), so there are no per-group offsets that would cost
  float32 precision. Entries are already sorted, so a descending ramp (all distinct) serves as the
  scores: ONNX Runtime then visits them in eager's order. Invalid entries get score 0, below the
  operator's score threshold of 0.5.

Both return a keep mask [G, K] like `nms_padded`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# Score given to invalid entries (0) and the operator's threshold: valid ramp values are >= 1.
_ONNX_SCORE_THRESHOLD = 0.5


def _nms_groups(boxes: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """Class-agnostic greedy NMS per group of score-sorted boxes [G, K, 4] (TorchScript)."""
    keep = torch.zeros_like(valid)
    ramp = torch.arange(boxes.shape[1], 0, -1, dtype=torch.float32, device=boxes.device)
    for group in range(boxes.shape[0]):
        index = torch.nonzero(valid[group]).squeeze(1)
        if index.numel() > 0:
            kept = torch.ops.torchvision.nms(boxes[group].index_select(0, index), ramp.index_select(0, index), iou_threshold)
            keep[group, index.index_select(0, kept)] = True
    return keep


def _nms_groups_by_label(boxes: Tensor, valid: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Per group and per label greedy NMS of score-sorted boxes [G, K, 4] (TorchScript)."""
    keep = torch.zeros_like(valid)
    ramp = torch.arange(boxes.shape[1], 0, -1, dtype=torch.float32, device=boxes.device)
    for group in range(boxes.shape[0]):
        index = torch.nonzero(valid[group]).squeeze(1)
        if index.numel() > 0:
            group_labels = labels[group].index_select(0, index)
            for label in torch.unique(group_labels):
                subset = index[group_labels == label]
                kept = torch.ops.torchvision.nms(boxes[group].index_select(0, subset), ramp.index_select(0, subset), iou_threshold)
                keep[group, subset.index_select(0, kept)] = True
    return keep


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice (no successor exports loops)
    nms_groups_script = torch.jit.script(_nms_groups)
    nms_groups_by_label_script = torch.jit.script(_nms_groups_by_label)


class OnnxNonMaxSuppression(torch.autograd.Function):
    """Selected (group, class, entry) triples [M, 3] int64, as ONNX's NonMaxSuppression returns.

    `forward` computes them eagerly (it runs while the exporter traces); `symbolic` is what the
    exporter writes instead."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
        from torchvision.ops import nms

        selected = []
        for group in range(boxes.shape[0]):
            for cls in range(scores.shape[1]):
                index = torch.nonzero(scores[group, cls] > _ONNX_SCORE_THRESHOLD).squeeze(1)
                if index.numel():
                    kept = index[nms(boxes[group, index], scores[group, cls, index], iou_threshold)]
                    triple = torch.stack([torch.full_like(kept, group), torch.full_like(kept, cls), kept], 1)
                    selected.append(triple)
        return torch.cat(selected) if selected else torch.zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float):
        max_out = g.op("Constant", value_t=torch.tensor([2**31 - 1], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32))
        score = g.op("Constant", value_t=torch.tensor([_ONNX_SCORE_THRESHOLD], dtype=torch.float32))
        # center_point_box=0: corners; ONNX reads them as (y1, x1, y2, x2), but IoU is symmetric in x and y.
        return g.op("NonMaxSuppression", boxes, scores, max_out, iou, score, center_point_box_i=0)


def nms_groups_onnx(boxes: Tensor, valid: Tensor, labels: Tensor | None, num_labels: int, iou_threshold: float) -> Tensor:
    """Keep mask [G, K] through ONNX's NonMaxSuppression; labels [G, K] in 1..num_labels or None."""
    k = valid.shape[1]
    ramp = torch.arange(k, 0, -1, dtype=torch.float32, device=boxes.device)
    if labels is None:
        scores = torch.where(valid, ramp, torch.zeros_like(ramp))[:, None, :]
    else:
        classes = torch.arange(1, num_labels + 1, device=boxes.device)
        member = (labels[:, None, :] == classes[None, :, None]) & valid[:, None, :]
        scores = torch.where(member, ramp, torch.zeros_like(ramp))
    selected = OnnxNonMaxSuppression.apply(boxes.float().contiguous(), scores, iou_threshold)
    flat = selected[:, 0] * k + selected[:, 2]
    kept = torch.zeros_like(valid.reshape(-1), dtype=torch.float32).scatter(0, flat, torch.ones_like(flat, dtype=torch.float32))
    return (kept > 0).view_as(valid)
