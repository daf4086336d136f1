"""Paste 28x28 mask probabilities into crops around their boxes instead of into the full image.

`paste_masks_transposed` gives every detection an image-size canvas: 100 MB per detection on a
10,000 x 10,000 image. Here each detection gets the rectangle its pasted mask can cover (its box
grown by the one-pixel mask padding, clipped to the image), with the same bilinear weights as the
full paste, restricted to those rows and columns. So the crop holds exactly the pixels the full
paste would set (tested), and the cost follows the object's size, not the image's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from segcli.ops.bilinear import bilinear_matrix
from segcli.ops.paste_masks import PADDING, expand_boxes_to_padded_mask
from segcli.ops.rle_crops import MaskCrop

# Float32 elements of one pasted block; a larger crop (a huge object) is pasted in column stripes.
STRIPE_ELEMENTS = 1 << 22


def paste_mask_crops(masks: Tensor, boxes: Tensor, image_height: int, image_width: int,
                     threshold: float = 0.5) -> list[MaskCrop]:
    """Masks [N, M, M] (probabilities in their boxes) and boxes [N, 4] (xyxy, image pixels) to N
    MaskCrops, each trimmed to the rectangle of its foreground pixels (prob > threshold)."""
    n, m = masks.shape[0], masks.shape[-1]
    if n == 0:
        return []
    masks, boxes = masks.float().cpu(), boxes.float().cpu()
    grown = expand_boxes_to_padded_mask(boxes, m)  # integer boxes of the padded masks, as the full paste
    size = m + 2 * PADDING
    x0 = grown[:, 0].clamp(0, image_width)
    y0 = grown[:, 1].clamp(0, image_height)
    x1 = (grown[:, 2] + 1).clamp(0, image_width)
    y1 = (grown[:, 3] + 1).clamp(0, image_height)
    widths, heights = (x1 - x0).clamp(min=0), (y1 - y0).clamp(min=0)
    sizes = torch.full_like(grown[:, 0], size)
    # Row c of wx is the weight row of image column x0 + c: the full paste's row, shifted.
    wx = bilinear_matrix(sizes, grown[:, 0] - x0, grown[:, 2] - grown[:, 0] + 1, size, max(1, int(widths.max())))
    wy = bilinear_matrix(sizes, grown[:, 1] - y0, grown[:, 3] - grown[:, 1] + 1, size, max(1, int(heights.max())))
    padded = F.pad(masks, (PADDING,) * 4)
    crops = []
    for i in range(n):
        w, h = int(widths[i]), int(heights[i])
        crop = np.zeros((h, w), bool)
        if w and h:
            left = wx[i, :w] @ padded[i].T  # [w, size]: each image column, along the mask's rows
            right = wy[i, :h].T  # [size, h]
            stripe = max(1, STRIPE_ELEMENTS // h)
            for lo in range(0, w, stripe):
                crop[:, lo:lo + stripe] = (left[lo:lo + stripe] @ right > threshold).T.numpy()
        crops.append(_trimmed(crop, int(x0[i]), int(y0[i]), (image_height, image_width)))
    return crops


def _trimmed(crop: np.ndarray, x0: int, y0: int, image_size: tuple[int, int]) -> MaskCrop:
    rows = np.flatnonzero(crop.any(axis=1))
    if rows.size == 0:
        return MaskCrop(np.zeros((0, 0), bool), x0, y0, image_size)
    cols = np.flatnonzero(crop.any(axis=0))
    top, left = int(rows[0]), int(cols[0])
    return MaskCrop(crop[top:rows[-1] + 1, left:cols[-1] + 1], x0 + left, y0 + top, image_size)
