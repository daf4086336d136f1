"""Masks as crops: put a small dense crop into an image-size COCO RLE, and read one back out,
without ever holding an image-size array.

A 10,000 x 10,000 image makes every full-size mask 100 MB, however small its object; sliced
inference (segcli.predict.slicing) and the writers that draw masks (PNG, overlays, polygons) work
on the crop around each object instead. COCO RLE runs down the columns (Fortran order), so a crop
at (x0, y0) becomes, per column, `y0` zeros, the crop's column and `H - y0 - h` zeros; the runs are
computed from the crop's value changes directly. The compressed string is parsed and written by
the same rules as pycocotools (which `frPyObjects` is used for), and tests compare both against
pycocotools' own encode and decode of the full-size mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass
class MaskCrop:
    """A binary mask given as the rectangle that holds its pixels: `mask` is [h, w] bool, its
    top-left pixel at (x0, y0) of an image of `image_size` (height, width)."""

    mask: np.ndarray
    x0: int
    y0: int
    image_size: tuple[int, int]

    @property
    def x1(self) -> int:
        return self.x0 + self.mask.shape[1]

    @property
    def y1(self) -> int:
        return self.y0 + self.mask.shape[0]

    @cached_property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    def iou(self, other: MaskCrop, dx: int = 0, dy: int = 0) -> float:
        """IoU with `other` after moving this mask by (dx, dy) whole pixels; costs the overlap of
        the two crops, not the image."""
        if self.area == 0 or other.area == 0:
            return 0.0
        ax, ay = self.x0 + dx, self.y0 + dy
        x0, y0 = max(ax, other.x0), max(ay, other.y0)
        x1, y1 = min(self.x1 + dx, other.x1), min(self.y1 + dy, other.y1)
        if x1 <= x0 or y1 <= y0:
            return 0.0
        inter = int(np.count_nonzero(self.mask[y0 - ay:y1 - ay, x0 - ax:x1 - ax]
                                     & other.mask[y0 - other.y0:y1 - other.y0, x0 - other.x0:x1 - other.x0]))
        return inter / (self.area + other.area - inter)


def crop_to_rle(mask: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict:
    """The COCO RLE (`{"size": [H, W], "counts": str}`) of an H x W image that is `mask` ([h, w],
    any dtype, non-zero = foreground) placed with its top-left pixel at (x0, y0), zero elsewhere.
    The crop must lie inside the image. Costs the crop's size, not the image's."""
    crop = np.asarray(mask) != 0
    h, w = crop.shape
    if x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height:
        raise ValueError(f"crop {w}x{h} at ({x0}, {y0}) does not fit in a {width}x{height} image")
    # One zero row above and below every column: then each column's runs start and end with a
    # change of value, and the zeros between columns (H - h of them) fall into those rows.
    padded = np.zeros((w, h + 2), np.int8)  # column-major: one row of `padded` per image column
    padded[:, 1:-1] = crop.T
    flat = padded.reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # index of the first element after a change
    column, row = np.divmod(changes, h + 2)
    # Linear (column-major) image index of those elements; padding rows map to y0 - 1 and y0 + h.
    positions = (x0 + column).astype(np.int64) * height + (y0 + row - 1)
    # A column whose mask reaches the image's bottom, followed by one that starts at its top, ends
    # and restarts a run at the same index: that run goes on over the column break.
    if positions.size > 1:
        same = positions[1:] == positions[:-1]
        positions = positions[~(np.append(same, False) | np.insert(same, 0, False))]
    counts = np.diff(np.concatenate([[0], positions, [height * width]]))
    if counts.size > 1 and counts[-1] == 0:  # the mask reaches the last pixel: no trailing zeros
        counts = counts[:-1]
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.astype(np.uint32)}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def rle_counts(rle: dict) -> np.ndarray:
    """The run lengths of a COCO RLE (compressed string or uncompressed list) as int64: zeros,
    ones, zeros, ..., down the columns. Parses the string by pycocotools' rules (5 bits per
    character, a sign bit on the last, runs after the second stored as a difference to the run two
    before)."""
    counts = rle["counts"]
    if isinstance(counts, (list, np.ndarray)):
        return np.asarray(counts, dtype=np.int64)
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    chars = np.frombuffer(data, np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, np.int64)
    last = (chars & 0x20) == 0  # the last character of each number
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    number = np.repeat(np.arange(ends.size), ends - starts + 1)
    shift = 5 * (np.arange(chars.size) - starts[number])
    values = np.add.reduceat((chars & 0x1F) << shift, starts)
    negative = (chars[ends] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * (ends - starts + 1))), values)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def rle_to_crop(rle: dict) -> MaskCrop:
    """The smallest rectangle holding every foreground pixel of `rle`, as a MaskCrop (an empty mask
    gives a 0 x 0 crop at (0, 0)). Costs the rectangle's size plus the number of runs."""
    height, width = (int(v) for v in rle["size"])
    runs = rle_counts(rle)
    ends = np.cumsum(runs)
    starts = ends - runs
    foreground = np.flatnonzero((np.arange(runs.size) % 2 == 1) & (runs > 0))
    if foreground.size == 0 or height == 0:
        return MaskCrop(np.zeros((0, 0), bool), 0, 0, (height, width))
    s, e = starts[foreground], ends[foreground]  # [s, e): linear column-major indices
    # A run may wrap over several columns: split it into one segment per column it touches.
    first, last = s // height, (e - 1) // height
    pieces = last - first + 1
    run = np.repeat(np.arange(s.size), pieces)
    column = first[run] + (np.arange(run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces))
    top = np.maximum(s[run] - column * height, 0)
    bottom = np.minimum(e[run] - column * height, height)  # exclusive
    x0, x1 = int(column.min()), int(column.max()) + 1
    y0, y1 = int(top.min()), int(bottom.max())
    h, w = y1 - y0, x1 - x0
    # Mark +1 where a segment starts and -1 where it ends, in the crop's column-major order.
    marks = np.zeros(w * h + 1, np.int32)
    offset = (column - x0) * h - y0
    np.add.at(marks, offset + top, 1)
    np.add.at(marks, offset + bottom, -1)
    crop = np.cumsum(marks[:-1]).astype(bool).reshape(w, h).T
    return MaskCrop(crop, x0, y0, (height, width))
