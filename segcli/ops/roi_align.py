"""Multi-level RoIAlign over an FPN: each RoI is pooled from the level that fits its size.

Level rule (FPN paper, eq. 1, as torchvision's LevelMapper): k = floor(4 + log2(sqrt(w*h)/224) + 1e-6),
clamped to the levels present. Features of level k have stride 2**k.

Paths:
- CUDA with Triton: one launch for all RoIs of all levels, each program reading its own level's
  map (`roi_align_triton`), so no boolean indexing and no host sync.
- Otherwise: torchvision's RoIAlign kernel once per level on the RoIs of that level (a loop over
  the 4 levels, not over images or RoIs).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align

CANONICAL_SCALE = 224.0
CANONICAL_LEVEL = 4.0


def assign_levels(boxes: Tensor, first_level: int, last_level: int) -> Tensor:
    """Index (0-based from `first_level`) of the FPN level each box [R, 4] is pooled from."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = torch.floor(CANONICAL_LEVEL + torch.log2(torch.sqrt(area) / CANONICAL_SCALE) + 1e-6)
    return (level.clamp(first_level, last_level) - first_level).to(torch.int64)


def level_scales(features: Sequence[Tensor], padded_size: tuple[int, int]) -> list[float]:
    """Spatial scale of each level: the power of two nearest to feature size / input size."""
    return [2.0 ** round(math.log2(f.shape[-2] / padded_size[0])) for f in features]


def multilevel_roi_align(
    features: Sequence[Tensor],
    boxes: Tensor,
    batch_index: Tensor,
    scales: Sequence[float],
    output_size: int,
    sampling_ratio: int = 2,
) -> Tensor:
    """Pool [R, C, output_size, output_size] float32 features for boxes [R, 4] (input-image coords)."""
    first = -round(math.log2(scales[0]))
    levels = assign_levels(boxes, first, first + len(features) - 1)
    if boxes.is_cuda:
        from segcli.ops import roi_align_triton  # triton is only worth importing for CUDA tensors

        if roi_align_triton.AVAILABLE:
            return roi_align_triton.roi_align_multilevel(
                features, boxes, batch_index, levels, scales, output_size, sampling_ratio
            )
    rois = torch.cat([batch_index[:, None].to(boxes.dtype), boxes], dim=1)
    out = boxes.new_zeros((boxes.shape[0], features[0].shape[1], output_size, output_size))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        index = torch.nonzero(levels == level).squeeze(1)
        if index.numel():
            pooled = tv_roi_align(feature.float(), rois[index], output_size, scale, sampling_ratio, aligned=False)
            out[index] = pooled
    return out
