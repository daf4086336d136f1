"""Box arithmetic shared by the RPN and the RoI heads (xyxy boxes, float32)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# exp() of a larger log-scale delta would overflow box sizes (Detectron's clip, as torchvision).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def decode_boxes(deltas: Tensor, anchors: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Apply (dx, dy, dw, dh) deltas [..., K*4] to anchors [..., 4] -> boxes [..., K, 4].

    Same operation order as torchvision's BoxCoder.decode_single, so results are bit-identical.
    """
    anchors = anchors.to(deltas.dtype)
    deltas = deltas.reshape(*deltas.shape[:-1], -1, 4)
    widths = (anchors[..., 2] - anchors[..., 0])[..., None]
    heights = (anchors[..., 3] - anchors[..., 1])[..., None]
    ctr_x = anchors[..., 0, None] + 0.5 * widths
    ctr_y = anchors[..., 1, None] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (deltas[..., 3] / wh).clamp(max=BBOX_XFORM_CLIP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = torch.tensor(0.5, dtype=pred_ctr_x.dtype, device=deltas.device) * (torch.exp(dw) * widths)
    half_h = torch.tensor(0.5, dtype=pred_ctr_y.dtype, device=deltas.device) * (torch.exp(dh) * heights)
    return torch.stack([pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h], dim=-1)


def encode_boxes(boxes: Tensor, anchors: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Inverse of decode_boxes for one box per anchor: [N, 4], [N, 4] -> deltas [N, 4]."""
    wx, wy, ww, wh = weights
    aw = anchors[:, 2] - anchors[:, 0]
    ah = anchors[:, 3] - anchors[:, 1]
    ax = anchors[:, 0] + 0.5 * aw
    ay = anchors[:, 1] + 0.5 * ah
    bw = boxes[:, 2] - boxes[:, 0]
    bh = boxes[:, 3] - boxes[:, 1]
    bx = boxes[:, 0] + 0.5 * bw
    by = boxes[:, 1] + 0.5 * bh
    return torch.stack(
        [wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah)], dim=1
    )


def clip_boxes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Clip boxes [B, ..., 4] to per-image (height, width) sizes [B, 2]."""
    shape = (sizes.shape[0],) + (1,) * (boxes.dim() - 2)
    height = sizes[:, 0].to(boxes.dtype).view(shape)
    width = sizes[:, 1].to(boxes.dtype).view(shape)
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), width[..., None])
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), height[..., None])
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """Boxes whose width and height are both at least min_size."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)
