"""Paste 28x28 mask probabilities into full images, all masks of a batch at once.

The result equals torchvision's `paste_masks_in_image` (pad the mask by one pixel, grow the box by
the same ratio, truncate the box to integers, bilinear-resize the mask to the box, copy it in),
but instead of one `interpolate` and one copy per mask it builds, per mask, the two sparse bilinear
weight matrices of that resize (rows outside the box are zero) and applies them with two batched
matrix products: out[n] = Wx[n] @ P[n]^T @ Wy[n]^T.

The output is stored transposed, [N, W, H]: then `masks.permute(2, 1, 0)` is a Fortran-ordered
[H, W, N] array, which is what pycocotools' RLE encoder reads, with no copy.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

PADDING = 1
# Memory for one chunk of float32 pasted masks; chunking bounds memory on large photos.
CHUNK_ELEMENTS = 1 << 25


def expand_boxes_to_padded_mask(boxes: Tensor, mask_size: int) -> Tensor:
    """Grow boxes [N, 4] by the ratio the one-pixel mask padding adds, then truncate to int64."""
    scale = (mask_size + 2 * PADDING) / mask_size
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    grown = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)
    return grown.to(torch.int64)


def resize_weights(start: Tensor, end: Tensor, src_size: int, dst_size: int) -> Tensor:
    """Bilinear weights [N, dst_size, src_size] that resize a src_size-long mask axis onto
    pixels start..end (inclusive, int64 per mask) of a dst_size-long image axis.

    Matches `F.interpolate(mode="bilinear", align_corners=False)` to the length end - start + 1
    followed by a copy clipped to the image.
    """
    length = (end - start + 1).clamp(min=1)  # torchvision: max(int(x1 - x0 + 1), 1)
    pixel = torch.arange(dst_size, device=start.device)
    local = pixel[None, :] - start[:, None]  # position inside the resized mask
    inside = (local >= 0) & (local < length[:, None])
    scale = src_size / length.to(torch.float32)
    src = ((local.to(torch.float32) + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    i0 = src.to(torch.int64).clamp(max=src_size - 1)
    i1 = (i0 + 1).clamp(max=src_size - 1)
    lam1 = src - i0.to(torch.float32)
    lam0 = 1.0 - lam1
    zero = torch.zeros((), device=start.device)
    lam0 = torch.where(inside, lam0, zero)
    lam1 = torch.where(inside, lam1, zero)
    weights = torch.zeros((start.shape[0], dst_size, src_size), device=start.device)
    weights.scatter_add_(2, i0.clamp(min=0)[..., None], lam0[..., None])
    weights.scatter_add_(2, i1.clamp(min=0)[..., None], lam1[..., None])
    return weights


def paste_masks_transposed(
    masks: Tensor, boxes: Tensor, image_height: int, image_width: int, threshold: float | None = 0.5
) -> Tensor:
    """Paste mask probabilities [N, M, M] at boxes [N, 4] (image coords) into [N, W, H] images.

    With `threshold` the result is bool (prob > threshold), else float32 probabilities.
    """
    n, m = masks.shape[0], masks.shape[-1]
    dtype = torch.float32 if threshold is None else torch.bool
    out = torch.empty((n, image_width, image_height), dtype=dtype, device=masks.device)
    if n == 0:
        return out
    padded = F.pad(masks.float(), (PADDING,) * 4)
    grown = expand_boxes_to_padded_mask(boxes.float(), m)
    size = m + 2 * PADDING
    chunk = max(1, CHUNK_ELEMENTS // max(1, image_height * image_width))
    for lo in range(0, n, chunk):  # bounded memory, not one iteration per mask
        hi = min(n, lo + chunk)
        g = grown[lo:hi]
        wx = resize_weights(g[:, 0], g[:, 2], size, image_width)
        wy = resize_weights(g[:, 1], g[:, 3], size, image_height)
        pasted = torch.bmm(torch.bmm(wx, padded[lo:hi].transpose(1, 2)), wy.transpose(1, 2))
        out[lo:hi] = pasted if threshold is None else pasted > threshold
    return out
