"""COCO run-length encoding of instance masks, without copying the mask stack."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# pycocotools is imported where it is used: a run that fails before its first result, or
# `segcli --help`, does not wait for it.


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Encode N binary masks given *width-major* as [N, W, H] into COCO RLE dicts.

    Each mask is stored transposed (mask n is `masks[n].T` in image terms) so that
    `masks.transpose(2, 1, 0)` is a Fortran-contiguous [H, W, N] view, the layout pycocotools
    encodes, and a C-contiguous input is never copied. (A model can produce this layout for free by
    pasting masks into a transposed canvas.) Values are bool or uint8 0/1; other non-zero uint8
    values are treated as 1 (costing one copy). Returns `{"size": [H, W], "counts": str}` per mask,
    counts as ASCII text so the dict is JSON-ready; N == 0 gives [].
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, W, H], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    from pycocotools import mask as mask_utils

    masks = _as_binary_uint8(masks)
    stack = masks.transpose(2, 1, 0)  # [H, W, N], Fortran order when `masks` is C order
    if not stack.flags.f_contiguous:
        stack = np.asfortranarray(stack)
    rles = mask_utils.encode(stack)
    return [{"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": _text(rle["counts"])} for rle in rles]


def rle_area(rles: Sequence[dict]) -> np.ndarray:
    """Foreground pixel count of each RLE (pycocotools `mask.area`), as a uint32 array of len(rles)."""
    from pycocotools import mask as mask_utils

    if len(rles) == 0:
        return np.zeros(0, np.uint32)
    return np.asarray(mask_utils.area(list(rles)), dtype=np.uint32).reshape(len(rles))


def _as_binary_uint8(masks: np.ndarray) -> np.ndarray:
    if masks.dtype == np.bool_:
        return masks.view(np.uint8)  # same bytes, no copy
    if masks.dtype == np.uint8 and masks.max() <= 1:
        return masks
    # pycocotools starts a new run at every change of value, so a 255 next to a 1 would break it.
    return (masks != 0).view(np.uint8)


def _text(counts: bytes | str) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts
