"""1-D bilinear resize as a matrix, one per row of a batch, so resizes of different sizes run as
one batched matrix product. Shared by batch preprocessing (images) and mask pasting (masks)."""

from __future__ import annotations

import torch
from torch import Tensor


def bilinear_matrix(src_sizes: Tensor, dst_starts: Tensor, dst_lengths: Tensor, src_len: int, dst_len: int) -> Tensor:
    """Weights [N, dst_len, src_len]: row n resizes its first src_sizes[n] entries to dst_lengths[n]
    entries placed at dst_starts[n] (other output positions get zero rows).

    Same arithmetic as `F.interpolate(mode="bilinear", align_corners=False)` with an explicit output
    size: source = (dst + 0.5) * (src / length) - 0.5, clamped at 0 and at the last entry.
    """
    device = src_sizes.device
    lengths = dst_lengths.clamp(min=1)
    local = torch.arange(dst_len, device=device)[None, :] - dst_starts[:, None]  # position in the resized row
    inside = (local >= 0) & (local < lengths[:, None])
    scale = src_sizes.to(torch.float32) / lengths.to(torch.float32)
    src = ((local.to(torch.float32) + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    last = (src_sizes - 1)[:, None]
    i0 = torch.minimum(src.to(torch.int64), last)
    i1 = torch.minimum(i0 + 1, last)
    lam1 = src - i0.to(torch.float32)
    zero = torch.zeros((), device=device)
    weights = torch.zeros((src_sizes.shape[0], dst_len, src_len), device=device)
    weights.scatter_add_(2, i0.clamp(0, src_len - 1)[..., None], torch.where(inside, 1.0 - lam1, zero)[..., None])
    weights.scatter_add_(2, i1.clamp(0, src_len - 1)[..., None], torch.where(inside, lam1, zero)[..., None])
    return weights
