"""The IoU threshold as float32, for NMS kernels that compare float32 IoUs (the CPU and Triton paths
alike) and must agree with torchvision's C++ comparison against a double."""

from __future__ import annotations

import numpy as np


def float32_threshold(iou_threshold: float) -> float:
    """The float32 t for which `iou > t` equals torchvision's test of a float32 IoU against a
    C++ double threshold: where rounding to float32 goes up, step one float32 down."""
    rounded = np.float32(iou_threshold)
    if float(rounded) > iou_threshold:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)
