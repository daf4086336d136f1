"""Multi-level RoIAlign over an FPN: each RoI is pooled from the level that fits its size.

Level rule (FPN paper, eq. 1, as torchvision's LevelMapper): k = floor(4 + log2(sqrt(w*h)/224) + 1e-6),
clamped to the levels present. Features of level k have stride 2**k.

Paths (both one call for all RoIs of all levels, no boolean indexing, no host sync):
- CUDA with Triton: each program reads its own RoI's level map (`roi_align_triton`).
- Otherwise, and whenever gradients are needed (training): every level's pixels as rows of one
  channels-last float32 table, and each output bin
  a weighted sum of its 4 samples x 4 bilinear taps: one `embedding_bag` call. On 2 CPU cores this
  is ~30x faster than torchvision's roi_align kernel, with the same values to ~1e-6.
  On the CPU its gradient is one more `embedding_bag`, over the transposed sum (`_BinGather`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

CANONICAL_SCALE = 224.0
CANONICAL_LEVEL = 4.0


def assign_levels(boxes: Tensor, first_level: int, last_level: int) -> Tensor:
    """Index (0-based from `first_level`) of the FPN level each box [R, 4] is pooled from."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = torch.floor(CANONICAL_LEVEL + torch.log2(torch.sqrt(area) / CANONICAL_SCALE) + 1e-6)
    return (level.clamp(first_level, last_level) - first_level).to(torch.int64)


class _BinGather(torch.autograd.Function):
    """embedding_bag's weighted sum of table rows, with a faster gradient for the CPU.

    The gradient of table row t is the sum, over every tap that read t, of its weight times its
    bin's gradient: the same weighted sum with bins and rows swapped. Sorting the taps by row (a
    stable sort, so each row sums its taps in bin order; measured bit-identical to embedding_bag's
    own gradient) turns it into one `embedding_bag` call. embedding_bag's dense backward took ~20%
    of a CPU training step; this takes a third of its time (tests/test_model_ops.py compares both,
    and the features' gradients with torchvision's RoIAlign backward)."""

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(rows, weights)
        ctx.table_rows = table.shape[0]
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, weights = ctx.saved_tensors
        return transposed_gather(grad, rows, weights, ctx.table_rows), None, None


def transposed_gather(grad: Tensor, rows: Tensor, weights: Tensor, table_rows: int) -> Tensor:
    """d(sum of weights * table[rows] per bin)/d(table) for bins' gradients `grad` [N, C]:
    [table_rows, C]. rows and weights are [N, taps]."""
    taps = rows.shape[1]
    flat = rows.reshape(-1)
    narrow = flat.to(torch.int32) if table_rows < 2**31 else flat  # int32 sorts ~2x faster
    order = narrow.sort(stable=True).indices
    counts = torch.bincount(flat, minlength=table_rows)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(order // taps, grad.contiguous(), offsets, per_sample_weights=weights.reshape(-1)[order],
                           mode="sum")


def level_scales(features: Sequence[Tensor], padded_size: tuple[int, int]) -> list[float]:
    """Spatial scale of each level: the power of two nearest to feature size / input size."""
    return [2.0 ** round(math.log2(f.shape[-2] / padded_size[0])) for f in features]


def _sample_points(boxes: Tensor, scale: Tensor, height: Tensor, width: Tensor, output_size: int, sampling_ratio: int,
                   aligned: bool = False):
    """Bilinear taps of torchvision's RoIAlign: per RoI, bin and sample, the four (y, x)
    neighbours and their weights, with torchvision's edge rules (and its `aligned` half-pixel
    shift, under which RoIs smaller than a pixel are not widened).

    Returns y [R, P*S, 4], x [R, P*S, 4] (int64) and weights [R, P*S, 4] (already divided by the
    sample count), where P = output_size**2 bins and S = sampling_ratio**2 samples per bin.
    """
    device = boxes.device
    start = boxes[:, :2] * scale[:, None] - (0.5 if aligned else 0.0)  # (x, y)
    size = (boxes[:, 2:] - boxes[:, :2]) * scale[:, None]
    size = size if aligned else size.clamp(min=1.0)
    bin_size = size / output_size
    grid = torch.arange(output_size, device=device, dtype=torch.float32)
    sub = (torch.arange(sampling_ratio, device=device, dtype=torch.float32) + 0.5) / sampling_ratio
    # Coordinates along one axis: [R, output_size, sampling_ratio].
    ys = start[:, 1, None, None] + grid[None, :, None] * bin_size[:, 1, None, None] + sub[None, None, :] * bin_size[:, 1, None, None]
    xs = start[:, 0, None, None] + grid[None, :, None] * bin_size[:, 0, None, None] + sub[None, None, :] * bin_size[:, 0, None, None]
    y_low, y_high, ly, y_ok = _axis_taps(ys, height[:, None, None])
    x_low, x_high, lx, x_ok = _axis_taps(xs, width[:, None, None])
    r = boxes.shape[0]
    # Broadcast to [R, oh, sh, ow, sw] then flatten to bins-major, samples-minor order.
    def grid2(a, b):
        return a[:, :, :, None, None], b[:, None, None, :, :]
    yl, xl = grid2(y_low, x_low)
    yh, xh = grid2(y_high, x_high)
    wy_l, wx_l = grid2(1.0 - ly, 1.0 - lx)
    wy_h, wx_h = grid2(ly, lx)
    ok_y, ok_x = grid2(y_ok, x_ok)
    ok = (ok_y & ok_x).to(torch.float32) / (sampling_ratio * sampling_ratio)
    full = (r, output_size, sampling_ratio, output_size, sampling_ratio)
    ys4 = torch.stack([yl.expand(full), yl.expand(full), yh.expand(full), yh.expand(full)], dim=-1)
    xs4 = torch.stack([xl.expand(full), xh.expand(full), xl.expand(full), xh.expand(full)], dim=-1)
    ws4 = torch.stack([wy_l * wx_l, wy_l * wx_h, wy_h * wx_l, wy_h * wx_h], dim=-1) * ok[..., None]
    order = (0, 1, 3, 2, 4, 5)  # [R, oh, ow, sh, sw, 4]
    shape = (r, output_size * output_size, sampling_ratio * sampling_ratio * 4)
    return (ys4.permute(order).reshape(shape), xs4.permute(order).reshape(shape), ws4.permute(order).reshape(shape))


def _axis_taps(coord: Tensor, length: Tensor):
    """torchvision's bilinear_interpolate along one axis: low/high index, fraction, in-range flag."""
    length_f = length.to(torch.float32)
    inside = (coord >= -1.0) & (coord <= length_f)
    coord = coord.clamp(min=0)
    low = coord.to(torch.int64)
    at_edge = low >= length - 1
    low = torch.where(at_edge, length - 1, low)
    high = torch.where(at_edge, low, low + 1)
    coord = torch.where(at_edge, low.to(torch.float32), coord)
    return low, high, coord - low.to(torch.float32), inside


def sample_masks(masks: Tensor, mask_index: Tensor, boxes: Tensor, output_size: int, sampling_ratio: int = 2) -> Tensor:
    """torchvision's `roi_align(masks[:, None].float(), ..., aligned=True)[:, 0]` for uint8 masks
    [M, H, W]: box i [R, 4] (mask pixel coordinates) pooled from masks[mask_index[i]], as
    float32 [R, output_size, output_size].

    Only the pixels the bilinear taps read are converted: training's mask targets read ~13k
    pixels per RoI from masks of whole photos, which as float32 were hundreds of megabytes per
    batch and a tenth of a CPU step."""
    count = boxes.shape[0]
    height, width = masks.shape[-2:]
    full = torch.ones(count, device=boxes.device, dtype=torch.float32)
    ys, xs, weights = _sample_points(boxes.float(), full, torch.full_like(mask_index, height),
                                     torch.full_like(mask_index, width), output_size, sampling_ratio, aligned=True)
    pixels = (mask_index[:, None, None] * height + ys) * width + xs
    values = masks.reshape(-1)[pixels.reshape(-1)].view(pixels.shape).to(torch.float32)
    return (values * weights).sum(-1).view(count, output_size, output_size)


class RoIPyramid:
    """The FPN levels RoIAlign reads, prepared once per forward pass and shared by the box and the
    mask stage. `features` are [N, C, H_l, W_l] maps of strides 4, 8, 16, 32, in any float dtype.

    Outputs are float32, or `dtype` (bfloat16 for heads that run in it: the gather still sums in
    float32 and rounds once) when no gradient is needed."""

    def __init__(self, features: Sequence[Tensor], padded_size: tuple[int, int], dtype: torch.dtype = torch.float32) -> None:
        self.features = list(features)
        self.scales = level_scales(self.features, padded_size)
        self.first_level = -round(math.log2(self.scales[0]))
        self._table: Tensor | None = None
        self.dtype = torch.float32 if self.needs_grad else dtype

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(f.requires_grad for f in self.features)

    def table(self) -> Tensor:
        """Every level's pixels as rows of channels: row = level offset + (n * H + y) * W + x."""
        if self._table is None:
            channels = self.features[0].shape[1]
            levels = [f.permute(0, 2, 3, 1).reshape(-1, channels) for f in self.features]
            if self.needs_grad:  # autograd scatters the gradient back through the concatenation
                self._table = torch.cat(levels).float()
                return self._table
            # Filled level by level, casting on the way: one pass, not a concatenation and a cast.
            table = torch.empty((sum(rows.shape[0] for rows in levels), channels), dtype=self.dtype, device=levels[0].device)
            start = 0
            for rows in levels:
                table[start:start + rows.shape[0]].copy_(rows)
                start += rows.shape[0]
            self._table = table
        return self._table

    def __call__(self, boxes: Tensor, batch_index: Tensor, output_size: int, sampling_ratio: int = 2) -> Tensor:
        """Pool [R, C, output_size, output_size] features for boxes [R, 4] (input-image coords); in
        channels-last memory when no gradient is needed (the heads read it as is)."""
        levels = assign_levels(boxes, self.first_level, self.first_level + len(self.features) - 1)
        # The Triton kernel has no backward pass; training takes the gather path, which autograd
        # differentiates (embedding_bag's gradient scatters into the feature table).
        if boxes.is_cuda and not self.needs_grad:
            from segcli.ops import roi_align_triton  # triton is only worth importing for CUDA tensors

            if roi_align_triton.AVAILABLE:
                return roi_align_triton.roi_align_multilevel(
                    self.features, boxes, batch_index, levels, self.scales, output_size, sampling_ratio
                )
        with torch.autocast(boxes.device.type, enabled=False):
            return self._gather(boxes.float(), batch_index, levels, output_size, sampling_ratio)

    def _gather(self, boxes: Tensor, batch_index: Tensor, levels: Tensor, output_size: int, sampling_ratio: int) -> Tensor:
        device = boxes.device
        sizes = torch.tensor([f.shape[-2:] for f in self.features], device=device)
        counts = torch.tensor([f.shape[0] * f.shape[2] * f.shape[3] for f in self.features], device=device)
        offsets = torch.cumsum(counts, 0) - counts
        scale = torch.tensor(self.scales, device=device, dtype=torch.float32)[levels]
        height, width = sizes[levels, 0, None, None], sizes[levels, 1, None, None]
        ys, xs, weights = _sample_points(boxes, scale, height[:, 0, 0], width[:, 0, 0], output_size, sampling_ratio)
        rows = offsets[levels][:, None, None] + (batch_index[:, None, None] * height + ys) * width + xs
        taps = rows.shape[-1]
        table = self.table()
        rows, weights = rows.reshape(-1, taps), weights.reshape(-1, taps).to(table.dtype)
        if table.requires_grad and table.device.type == "cpu":
            pooled = _BinGather.apply(table, rows, weights)
        else:  # CUDA's embedding_bag backward kernel is fast already
            pooled = F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
        channels = self.features[0].shape[1]
        pooled = pooled.view(boxes.shape[0], output_size, output_size, channels).permute(0, 3, 1, 2)
        return pooled.contiguous() if self.needs_grad else pooled
