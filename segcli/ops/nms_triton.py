"""Greedy NMS over padded, pre-sorted groups in a single Triton launch.

``nms_padded`` reproduces torchvision's greedy NMS (bit-identical IoU, same
strict ``>`` test against the double-precision threshold) for ``G`` groups at
once without any device-to-host synchronisation: the number of entries to
visit is derived from ``valid`` inside the kernel, never on the host.

The module imports without Triton; ``AVAILABLE`` tells whether the kernel can
be used.  Choosing when to use it is the job of ``segcli.ops.nms``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from segcli.ops.iou_threshold import float32_threshold

try:  # Triton is optional: CPU-only installs (and some platforms) lack it.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

AVAILABLE: bool = triton is not None

__all__ = ["AVAILABLE", "nms_padded"]

# Largest number of candidates handled per inner iteration; longer groups are
# processed in several blocks of this size.
_MAX_BLOCK = 1024


if AVAILABLE:

    @triton.jit
    def _nms_padded_kernel(
        boxes_ptr,  # *fp32 [G, K, 4] contiguous
        valid_ptr,  # *u8   [G, K]    contiguous (bool viewed as uint8)
        labels_ptr,  # *i64 [G, K]    contiguous (unused unless HAS_LABELS)
        keep_ptr,  # *u8    [G, K]    output
        K,
        iou_threshold,  # fp32; "iou > iou_threshold" suppresses
        HAS_LABELS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        g = tl.program_id(0).to(tl.int64)
        box_base = boxes_ptr + g * K * 4
        valid_base = valid_ptr + g * K
        keep_base = keep_ptr + g * K
        label_base = labels_ptr + g * K
        offs = tl.arange(0, BLOCK)

        # keep := valid, and n := 1 + index of the last valid entry (read from
        # the data on the device: entries past it can neither be kept nor
        # suppress anything).
        n = tl.zeros((), dtype=tl.int32)
        for start in range(0, K, BLOCK):
            j = start + offs
            m = j < K
            v = tl.load(valid_base + j, mask=m, other=0)
            tl.store(keep_base + j, v, mask=m)
            n = tl.maximum(n, tl.max(tl.where(v != 0, j + 1, 0), axis=0))
        # Every thread of the program must see the stores above (and, below,
        # the suppressions of the previous iteration) before reading keep[i].
        tl.debug_barrier()

        # Greedy, in score order: a still-kept entry i is final (all entries
        # that could suppress it come before it) and suppresses later ones.
        for i in range(0, n):
            keep_i = tl.load(keep_base + i)
            if keep_i != 0:
                x1i = tl.load(box_base + i * 4 + 0)
                y1i = tl.load(box_base + i * 4 + 1)
                x2i = tl.load(box_base + i * 4 + 2)
                y2i = tl.load(box_base + i * 4 + 3)
                area_i = (x2i - x1i) * (y2i - y1i)
                if HAS_LABELS:
                    label_i = tl.load(label_base + i)
                for start in range(i + 1, n, BLOCK):
                    j = start + offs
                    m = j < n
                    keep_j = tl.load(keep_base + j, mask=m, other=0)
                    m = m & (keep_j != 0)
                    x1j = tl.load(box_base + j * 4 + 0, mask=m, other=0.0)
                    y1j = tl.load(box_base + j * 4 + 1, mask=m, other=0.0)
                    x2j = tl.load(box_base + j * 4 + 2, mask=m, other=0.0)
                    y2j = tl.load(box_base + j * 4 + 3, mask=m, other=0.0)
                    # torchvision's float32 formula, evaluated in the same order
                    # (the launch disables FMA contraction so it rounds the same).
                    area_j = (x2j - x1j) * (y2j - y1j)
                    w = tl.maximum(tl.minimum(x2i, x2j) - tl.maximum(x1i, x1j), 0.0)
                    h = tl.maximum(tl.minimum(y2i, y2j) - tl.maximum(y1i, y1j), 0.0)
                    inter = w * h
                    iou = tl.div_rn(inter, (area_i + area_j) - inter)
                    suppress = m & (iou > iou_threshold)
                    if HAS_LABELS:
                        label_j = tl.load(label_base + j, mask=m, other=0)
                        suppress = suppress & (label_j == label_i)
                    tl.store(keep_base + j, tl.zeros_like(keep_j), mask=suppress)
            tl.debug_barrier()


def _launch_config(K: int) -> tuple[int, int]:
    block = max(16, min(_MAX_BLOCK, triton.next_power_of_2(K)))
    # ~4 candidates per thread in the inner loop; small groups get one warp.
    num_warps = max(1, min(8, block // 128))
    return block, num_warps


def nms_padded(
    boxes: Tensor,
    valid: Tensor,
    labels: Optional[Tensor],
    iou_threshold: float,
) -> Tensor:
    """Greedy NMS independently in each of ``G`` padded groups.

    Args:
        boxes: ``[G, K, 4]`` float32 boxes ``(x1, y1, x2, y2)``; within each
            group the entries are already sorted by descending score.
        valid: ``[G, K]`` bool; invalid entries (anywhere in the group) are
            neither kept nor suppress anything.
        labels: ``[G, K]`` integer class labels (only same-label pairs
            suppress each other) or ``None`` (every pair in a group may).
        iou_threshold: entry ``j`` is suppressed by an earlier kept entry
            ``i`` iff ``IoU(i, j) > iou_threshold`` (strict, as torchvision).

    Returns:
        ``[G, K]`` bool keep mask, identical to running torchvision's
        ``nms``/``batched_nms`` on each group's valid entries.

    One program per group, a single launch, no device-to-host sync.
    """
    if not AVAILABLE:
        raise RuntimeError("segcli.ops.nms_triton.nms_padded needs Triton, which is not installed")
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [G, K, 4], got {tuple(boxes.shape)}")
    G, K = boxes.shape[0], boxes.shape[1]
    if tuple(valid.shape) != (G, K):
        raise ValueError(f"valid must be [G, K] = {(G, K)}, got {tuple(valid.shape)}")
    if labels is not None and tuple(labels.shape) != (G, K):
        raise ValueError(f"labels must be [G, K] = {(G, K)}, got {tuple(labels.shape)}")
    device = boxes.device
    if valid.device != device or (labels is not None and labels.device != device):
        raise ValueError("boxes, valid and labels must be on the same device")

    keep = torch.empty((G, K), dtype=torch.uint8, device=device)
    if G == 0 or K == 0:
        return keep.view(torch.bool)

    boxes_c = boxes.to(torch.float32).contiguous()
    valid_c = valid.to(torch.bool).contiguous().view(torch.uint8)
    has_labels = labels is not None
    labels_c = labels.to(torch.int64).contiguous() if has_labels else valid_c  # dummy pointer

    block, num_warps = _launch_config(K)
    _nms_padded_kernel[(G,)](
        boxes_c,
        valid_c,
        labels_c,
        keep,
        K,
        float32_threshold(iou_threshold),
        HAS_LABELS=has_labels,
        BLOCK=block,
        num_warps=num_warps,
        num_stages=1,
        enable_fp_fusion=False,
    )
    return keep.view(torch.bool)
