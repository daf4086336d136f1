"""Multi-level RoIAlign (FPN pooler) in a single Triton launch.

``roi_align_multilevel`` pools every RoI from its own pyramid level in one
kernel launch: the (up to five) level tensors are passed as separate
pointer/shape/stride arguments and each program picks its level from
``levels[r]`` on the device, so there is no host sync and no per-level
gather/scatter.  Row ``r`` of the result equals::

    torchvision.ops.roi_align(features[levels[r]],
                              torch.cat([batch_idx[r:r+1, None].float(), rois[r:r+1]], 1),
                              output_size, spatial_scales[levels[r]], sampling_ratio, aligned)

(computed in float32 whatever the feature dtype).

The module imports without Triton; ``AVAILABLE`` tells whether the kernel can
be used.  Choosing when to use it is the job of ``segcli.ops.roi_align``.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

try:  # Triton is optional: CPU-only installs (and some platforms) lack it.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

AVAILABLE: bool = triton is not None

__all__ = ["AVAILABLE", "MAX_LEVELS", "roi_align_multilevel"]

MAX_LEVELS = 5

# A program accumulates a [channels, bins] tile with ~4 values per thread: more
# raises register use (each value also needs four gathered values and their
# 64-bit addresses) and lowers the occupancy that hides the gathers' latency.
_VALUES_PER_THREAD = 4
_MIN_TILE = 512
_MAX_TILE = 1024
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Integer shape/stride arguments equal to 1 would otherwise be specialised into
# compile-time constants (and break the per-level selection); contiguity is
# passed explicitly through C_CONTIG / W_CONTIG instead.
_NO_SPECIALIZE = [f"{a}{i}" for i in range(MAX_LEVELS) for a in ("H", "W", "sN", "sC", "sH", "sW")] + ["C"]

if AVAILABLE:

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _roi_align_multilevel_kernel(
        out_ptr,  # *fp32 [R, C, PH, PW] contiguous
        rois_ptr,  # *fp32 [R, 4] contiguous
        batch_ptr,  # *int [R]
        level_ptr,  # *int [R]
        f0, f1, f2, f3, f4,  # level feature maps (unused slots repeat f0)
        H0, W0, sN0, sC0, sH0, sW0, scale0,
        H1, W1, sN1, sC1, sH1, sW1, scale1,
        H2, W2, sN2, sC2, sH2, sW2, scale2,
        H3, W3, sN3, sC3, sH3, sW3, scale3,
        H4, W4, sN4, sC4, sH4, sW4, scale4,
        C,
        NUM_LEVELS: tl.constexpr,
        PH: tl.constexpr,
        PW: tl.constexpr,
        SAMPLING: tl.constexpr,  # > 0: fixed grid; <= 0: ceil(roi_size / pooled)
        ALIGNED: tl.constexpr,
        C_CONTIG: tl.constexpr,  # every level has stride(1) == 1 (channels_last)
        W_CONTIG: tl.constexpr,  # every level has stride(3) == 1 (NCHW)
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        cblk = tl.program_id(1)

        # ---- pick this RoI's level (on the device, no sync) ----------------
        lvl = tl.load(level_ptr + r)
        feat = f0
        H = H0
        W = W0
        sN = sN0
        sC = sC0
        sH = sH0
        sW = sW0
        scale = scale0
        if NUM_LEVELS > 1:
            sel = lvl == 1
            feat = tl.where(sel, f1, feat)
            H = tl.where(sel, H1, H)
            W = tl.where(sel, W1, W)
            sN = tl.where(sel, sN1, sN)
            sC = tl.where(sel, sC1, sC)
            sH = tl.where(sel, sH1, sH)
            sW = tl.where(sel, sW1, sW)
            scale = tl.where(sel, scale1, scale)
        if NUM_LEVELS > 2:
            sel = lvl == 2
            feat = tl.where(sel, f2, feat)
            H = tl.where(sel, H2, H)
            W = tl.where(sel, W2, W)
            sN = tl.where(sel, sN2, sN)
            sC = tl.where(sel, sC2, sC)
            sH = tl.where(sel, sH2, sH)
            sW = tl.where(sel, sW2, sW)
            scale = tl.where(sel, scale2, scale)
        if NUM_LEVELS > 3:
            sel = lvl == 3
            feat = tl.where(sel, f3, feat)
            H = tl.where(sel, H3, H)
            W = tl.where(sel, W3, W)
            sN = tl.where(sel, sN3, sN)
            sC = tl.where(sel, sC3, sC)
            sH = tl.where(sel, sH3, sH)
            sW = tl.where(sel, sW3, sW)
            scale = tl.where(sel, scale3, scale)
        if NUM_LEVELS > 4:
            sel = lvl == 4
            feat = tl.where(sel, f4, feat)
            H = tl.where(sel, H4, H)
            W = tl.where(sel, W4, W)
            sN = tl.where(sel, sN4, sN)
            sC = tl.where(sel, sC4, sC)
            sH = tl.where(sel, sH4, sH)
            sW = tl.where(sel, sW4, sW)
            scale = tl.where(sel, scale4, scale)
        if C_CONTIG:
            sC = 1
        if W_CONTIG:
            sW = 1
        H = H.to(tl.int32)
        W = W.to(tl.int32)

        # ---- RoI geometry, exactly as torchvision's roi_align kernel -------
        x1 = tl.load(rois_ptr + r * 4 + 0)
        y1 = tl.load(rois_ptr + r * 4 + 1)
        x2 = tl.load(rois_ptr + r * 4 + 2)
        y2 = tl.load(rois_ptr + r * 4 + 3)
        if ALIGNED:
            roi_start_w = x1 * scale - 0.5
            roi_start_h = y1 * scale - 0.5
            roi_end_w = x2 * scale - 0.5
            roi_end_h = y2 * scale - 0.5
        else:
            roi_start_w = x1 * scale
            roi_start_h = y1 * scale
            roi_end_w = x2 * scale
            roi_end_h = y2 * scale
        roi_w = roi_end_w - roi_start_w
        roi_h = roi_end_h - roi_start_h
        if not ALIGNED:  # force malformed RoIs to be 1x1
            roi_w = tl.maximum(roi_w, 1.0)
            roi_h = tl.maximum(roi_h, 1.0)
        bin_h = tl.div_rn(roi_h, tl.full((), PH, tl.float32))
        bin_w = tl.div_rn(roi_w, tl.full((), PW, tl.float32))
        if SAMPLING > 0:
            grid_h = tl.full((), SAMPLING, tl.int32)
            grid_w = tl.full((), SAMPLING, tl.int32)
        else:
            grid_h = tl.ceil(bin_h).to(tl.int32)
            grid_w = tl.ceil(bin_w).to(tl.int32)
        count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
        grid_hf = grid_h.to(tl.float32)
        grid_wf = grid_w.to(tl.float32)
        Hf = H.to(tl.float32)
        Wf = W.to(tl.float32)

        # ---- tile: BLOCK_C channels x BLOCK_P output bins -------------------
        pb = tl.arange(0, BLOCK_P)
        p_mask = pb < PH * PW
        ph = (pb // PW).to(tl.float32)
        pw = (pb % PW).to(tl.float32)
        cc = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = cc < C
        tile_mask = c_mask[:, None] & p_mask[None, :]

        b = tl.load(batch_ptr + r).to(tl.int64)
        chan_ptr = feat + b * sN + (cc.to(tl.int64) * sC)[:, None]  # [BLOCK_C, 1]
        y_bin = roi_start_h + ph * bin_h  # [BLOCK_P]
        x_bin = roi_start_w + pw * bin_w

        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        for iy in range(0, grid_h):
            y = y_bin + tl.div_rn((iy + 0.5) * bin_h, grid_hf)
            y_in = (y >= -1.0) & (y <= Hf)
            y = tl.where(y_in, tl.maximum(y, 0.0), 0.0)
            y_low = y.to(tl.int32)
            y_top = y_low >= H - 1
            y_low = tl.where(y_top, H - 1, y_low)
            y_high = tl.where(y_top, H - 1, y_low + 1)
            y = tl.where(y_top, y_low.to(tl.float32), y)
            ly = y - y_low.to(tl.float32)
            hy = 1.0 - ly
            row_low = y_low.to(tl.int64) * sH
            row_high = y_high.to(tl.int64) * sH
            for ix in range(0, grid_w):
                x = x_bin + tl.div_rn((ix + 0.5) * bin_w, grid_wf)
                x_in = (x >= -1.0) & (x <= Wf)
                x = tl.where(x_in, tl.maximum(x, 0.0), 0.0)
                x_low = x.to(tl.int32)
                x_top = x_low >= W - 1
                x_low = tl.where(x_top, W - 1, x_low)
                x_high = tl.where(x_top, W - 1, x_low + 1)
                x = tl.where(x_top, x_low.to(tl.float32), x)
                lx = x - x_low.to(tl.float32)
                hx = 1.0 - lx
                col_low = x_low.to(tl.int64) * sW
                col_high = x_high.to(tl.int64) * sW

                inside = y_in & x_in  # samples outside the map contribute 0
                m = tile_mask & inside[None, :]
                w1 = (hy * hx)[None, :]
                w2 = (hy * lx)[None, :]
                w3 = (ly * hx)[None, :]
                w4 = (ly * lx)[None, :]
                v1 = tl.load(chan_ptr + (row_low + col_low)[None, :], mask=m, other=0.0).to(tl.float32)
                v2 = tl.load(chan_ptr + (row_low + col_high)[None, :], mask=m, other=0.0).to(tl.float32)
                v3 = tl.load(chan_ptr + (row_high + col_low)[None, :], mask=m, other=0.0).to(tl.float32)
                v4 = tl.load(chan_ptr + (row_high + col_high)[None, :], mask=m, other=0.0).to(tl.float32)
                acc += w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4

        res = tl.div_rn(acc, count)
        out_offs = (r * C + cc.to(tl.int64))[:, None] * (PH * PW) + pb[None, :]
        tl.store(out_ptr + out_offs, res, mask=tile_mask)


def _pair(output_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    ph, pw = output_size
    return int(ph), int(pw)


def _launch_config(C: int, ph: int, pw: int) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps): all bins of a RoI and as many channels
    as fit a 512..1024-value tile, ~4 values per thread."""
    block_p = triton.next_power_of_2(ph * pw)
    tile = min(_MAX_TILE, max(_MIN_TILE, 4 * block_p))
    block_c = max(1, min(triton.next_power_of_2(C), tile // block_p))
    num_warps = max(1, min(8, (block_c * block_p) // (32 * _VALUES_PER_THREAD)))
    return block_c, block_p, num_warps


def roi_align_multilevel(
    features: Sequence[Tensor],
    rois: Tensor,
    batch_idx: Tensor,
    levels: Tensor,
    spatial_scales: Sequence[float],
    output_size: Union[int, Tuple[int, int]],
    sampling_ratio: int,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign of each RoI on its own pyramid level, in a single launch.

    Args:
        features: 1..5 maps ``[N, C, H_l, W_l]`` (float32/float16/bfloat16,
            any strides, e.g. contiguous or channels_last), same N, C, dtype
            and device.
        rois: ``[R, 4]`` float32 ``(x1, y1, x2, y2)`` in input-image coordinates.
        batch_idx: ``[R]`` integer image index of each RoI (must be in ``[0, N)``).
        levels: ``[R]`` integer index into ``features`` (must be in range;
            not checked, as that would need a host sync).
        spatial_scales: one scale per level (e.g. 1/4 .. 1/32).
        output_size: pooled size (int or ``(h, w)``).
        sampling_ratio: samples per bin per axis; ``<= 0``: adaptive
            ``ceil(roi_size / output_size)``, like torchvision.
        aligned: torchvision's ``aligned`` (half-pixel shift, no 1x1 minimum).

    Returns:
        ``[R, C, ph, pw]`` float32 (accumulated in float32).
    """
    if not AVAILABLE:
        raise RuntimeError("segcli.ops.roi_align_triton.roi_align_multilevel needs Triton, which is not installed")
    features = list(features)
    num_levels = len(features)
    if not 1 <= num_levels <= MAX_LEVELS:
        raise ValueError(f"expected 1..{MAX_LEVELS} feature levels, got {num_levels}")
    if len(spatial_scales) != num_levels:
        raise ValueError(f"got {len(spatial_scales)} spatial scales for {num_levels} levels")
    for f in features:
        if f.dim() != 4:
            raise ValueError(f"features must be [N, C, H, W], got {tuple(f.shape)}")
    N, C = features[0].shape[0], features[0].shape[1]
    if any(f.shape[0] != N or f.shape[1] != C for f in features):
        raise ValueError("all feature levels must have the same N and C")
    if rois.dim() != 2 or rois.shape[1] != 4:
        raise ValueError(f"rois must be [R, 4], got {tuple(rois.shape)}")
    R = rois.shape[0]
    if tuple(batch_idx.shape) != (R,) or tuple(levels.shape) != (R,):
        raise ValueError("batch_idx and levels must be [R]")
    device = rois.device
    if any(t.device != device for t in (*features, batch_idx, levels)):
        raise ValueError("features, rois, batch_idx and levels must be on the same device")
    ph, pw = _pair(output_size)
    if ph <= 0 or pw <= 0:
        raise ValueError(f"output_size must be positive, got {output_size}")

    out = torch.empty((R, C, ph, pw), dtype=torch.float32, device=device)
    if R == 0 or C == 0:
        return out
    if any(f.shape[2] == 0 or f.shape[3] == 0 for f in features):
        raise ValueError("feature maps must be non-empty")

    dtype = features[0].dtype
    if dtype not in _SUPPORTED_DTYPES or any(f.dtype != dtype for f in features):
        features = [f.float() for f in features]
    rois_c = rois.to(torch.float32).contiguous()
    batch_c = batch_idx.contiguous()
    levels_c = levels.contiguous()

    level_args = []
    for i in range(MAX_LEVELS):
        f = features[i] if i < num_levels else features[0]
        scale = float(spatial_scales[i]) if i < num_levels else float(spatial_scales[0])
        level_args += [f.shape[2], f.shape[3], *f.stride(), scale]
    pads = [features[i] if i < num_levels else features[0] for i in range(MAX_LEVELS)]
    c_contig = all(f.stride(1) == 1 for f in features)
    w_contig = all(f.stride(3) == 1 for f in features)

    block_c, block_p, num_warps = _launch_config(C, ph, pw)
    grid = (R, triton.cdiv(C, block_c))
    _roi_align_multilevel_kernel[grid](
        out,
        rois_c,
        batch_c,
        levels_c,
        *pads,
        *level_args,
        C,
        NUM_LEVELS=num_levels,
        PH=ph,
        PW=pw,
        SAMPLING=int(sampling_ratio),
        ALIGNED=bool(aligned),
        C_CONTIG=c_contig,
        W_CONTIG=w_contig,
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        num_warps=num_warps,
        num_stages=1,
        enable_fp_fusion=False,
    )
    return out
