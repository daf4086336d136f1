"""Batch preprocessing on the model's device: uint8 images -> normalized, resized, padded floats.

Same arithmetic as torchvision's GeneralizedRCNNTransform (scale to [0, 1], normalize, resize so
the short side is `min_size` unless the long side would pass `max_size`, pad to a multiple of 32),
but for the whole batch at once. A batch of equal-sized images is resized with one `interpolate`;
a batch of mixed sizes with two batched matrix products whose rows are each image's own bilinear
weights (rows past an image's resized size are zero, which is also the padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from segcli.ops.bilinear import bilinear_matrix

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
SIZE_DIVISIBLE = 32


@dataclass(frozen=True)
class ResizePolicy:
    min_size: int
    max_size: int

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized (height, width), computed as torchvision does (double precision, floor), but
        never 0: a strip like 65535 x 1 floors its short side to 0 pixels, on which interpolate
        (and cv2.resize for the sliced whole-image pass) raise and end the whole run with a
        traceback. Sizes torchvision gives as 1 or more are unchanged."""
        scale = min(float(self.min_size) / min(height, width), float(self.max_size) / max(height, width))
        return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


@dataclass
class PreparedBatch:
    """Network input plus what postprocessing needs to map results back to each image."""

    tensor: Tensor  # [B, 3, Hp, Wp] float32, padded to a multiple of 32
    resized_sizes: list[tuple[int, int]]  # per image, after resize, before padding
    original_sizes: list[tuple[int, int]]


def padded_size(height: int, width: int) -> tuple[int, int]:
    """Round a resized size up to the multiple of 32 the backbone's strides need."""
    return tuple(int(math.ceil(n / SIZE_DIVISIBLE) * SIZE_DIVISIBLE) for n in (height, width))


def prepare_batch(images: Tensor, sizes: list[tuple[int, int]], policy: ResizePolicy) -> PreparedBatch:
    """images: [B, Hmax, Wmax, 3] uint8 (each image top-left, sizes[i] = (h, w)), on any device."""
    out_sizes = [policy.output_size(h, w) for h, w in sizes]
    out_h, out_w = max(s[0] for s in out_sizes), max(s[1] for s in out_sizes)
    mean = torch.tensor(IMAGE_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(IMAGE_STD, device=images.device)[:, None, None]
    x = images.permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)
    x = (x - mean) / std
    with torch.autocast(images.device.type, enabled=False):
        if len(set(sizes)) == 1:
            h, w = sizes[0]
            x = F.interpolate(x[:, :, :h, :w], size=out_sizes[0], mode="bilinear", align_corners=False)
        else:
            device = images.device
            in_t = torch.tensor(sizes, device=device)
            res_t = torch.tensor(out_sizes, device=device)
            start = torch.zeros_like(in_t[:, 0])
            wy = bilinear_matrix(in_t[:, 0], start, res_t[:, 0], x.shape[2], out_h)
            wx = bilinear_matrix(in_t[:, 1], start, res_t[:, 1], x.shape[3], out_w)
            x = torch.matmul(torch.matmul(wy[:, None], x), wx[:, None].transpose(-1, -2))
    target_h, target_w = padded_size(out_h, out_w)
    pad_h, pad_w = target_h - x.shape[2], target_w - x.shape[3]
    x = F.pad(x, (0, pad_w, 0, pad_h))
    return PreparedBatch(tensor=x, resized_sizes=out_sizes, original_sizes=list(sizes))
