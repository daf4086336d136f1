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

from segcli.ops.bilinear import bilinear_matrix

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
        # torchvision resizes the padded mask to the box's integer size, max(x1 - x0 + 1, 1).
        sizes = torch.full_like(g[:, 0], size)
        wx = bilinear_matrix(sizes, g[:, 0], g[:, 2] - g[:, 0] + 1, size, image_width)
        wy = bilinear_matrix(sizes, g[:, 1], g[:, 3] - g[:, 1] + 1, size, image_height)
        pasted = torch.bmm(torch.bmm(wx, padded[lo:hi].transpose(1, 2)), wy.transpose(1, 2))
        out[lo:hi] = pasted if threshold is None else pasted > threshold
    return out
