"""Masks as files hold them (polygons, compressed or uncompressed RLE, broken outlines) made into
what pycocotools scores, or a `UsageError` naming the annotation."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segcli.data.coco import polygon_readable, rle_readable
from segcli.errors import UsageError


def plain_mask(segmentation: Any, height: int, width: int, label: str) -> bool:
    """True for a mask pycocotools reads as it is (checked by shape, without decoding it): polygons
    of at least 3 points, or RLE of the image's size. False for outlines it cannot read (empty,
    fewer than 3 points). UsageError for anything that is not a mask at all."""
    if isinstance(segmentation, list):
        # Coordinates are checked too: pycocotools crashes the process on NaN or None in a
        # polygon, and runs out of memory on huge ones (see polygon_readable).
        return bool(segmentation) and all(polygon_readable(p, height, width) for p in segmentation)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if rle_size(segmentation) != [height, width]:
            raise UsageError(f"{label}: mask size {segmentation['size']!r} is not its image's [{height}, {width}]")
        # pycocotools would fail on such counts only when COCOeval reads them: say it now.
        if not rle_readable(segmentation, height, width):
            raise UsageError(f"{label}: malformed RLE (counts are not run lengths that fill its "
                             f"{height}x{width} image)")
        return True
    raise UsageError(f"{label}: segmentation is neither polygons nor RLE")


def mask_rle(segmentation: Any, height: int, width: int, label: str) -> dict:
    """Any polygon or RLE mask as one compressed RLE; outlines of fewer than 3 points are dropped."""
    try:
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if polygon_readable(p, height, width)]
            if not polygons:
                return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
            return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
            return {"size": [height, width], "counts": segmentation["counts"]}
    except Exception as error:  # pycocotools raises bare Exceptions and TypeErrors on malformed masks
        raise UsageError(f"{label}: unreadable segmentation ({error})")
    raise UsageError(f"{label}: segmentation is neither polygons nor RLE")



def rle_size(segmentation: dict) -> Any:
    """An RLE's `size` as a list to compare with [height, width]; whatever else a file holds there
    (a number, null: `list()` of it would raise) as it is, which compares unequal."""
    size = segmentation["size"]
    return list(size) if isinstance(size, (list, tuple)) else size

