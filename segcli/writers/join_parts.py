"""Join the parts of one instance into one polygon, for formats that have one polygon per object.

A YOLO-seg line is one object with one polygon, and a mask in two blobs (a person behind a pole)
is still one object. Ultralytics' own COCO-to-YOLO converter (`convert_coco`, its
`merge_multi_segment`) joins the parts of a COCO annotation into one polygon: consecutive parts
are linked at their two nearest vertices, and the path walks forward through the parts and back
again, so every link is travelled once each way. The links have no width: a reader that fills the
polygon (`cv2.fillPoly`) gets the parts, plus the one-pixel line of each link. This module builds
the same kind of path; it orders the rings nearest-first (from the largest) to keep links short.

Holes join the same way. `cv2.fillPoly` and Pillow fill by the even-odd rule, so a hole's ring
walked inside its part's ring stays empty: Ultralytics and supervision read the hole back.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_PAIRS_PER_CHUNK = 1 << 20  # nearest-vertex search: distances computed this many at a time


def join_parts(rings: Sequence[np.ndarray]) -> np.ndarray:
    """One path `[N, 2]` through all `rings` (each `[n, 2]`, not closed, largest first), not closed.

    One ring comes back unchanged. For several, the path visits every ring's every edge once,
    joined by zero-width links between nearest vertices: filled by the even-odd rule, it covers
    what the rings enclose an odd number of times (parts, less their holes), plus the links.
    """
    rings = [np.asarray(ring, dtype=np.float64).reshape(-1, 2) for ring in rings if len(ring)]
    if len(rings) <= 1:
        return rings[0] if rings else np.zeros((0, 2))
    rings = [rings[k] for k in _nearest_first(rings)]
    links = [_nearest_vertices(a, b) for a, b in zip(rings, rings[1:])]  # (leave a at i, enter b at j)
    last = len(rings) - 1
    forward, backward = [], []
    for k, ring in enumerate(rings):
        start = links[0][0] if k == 0 else links[k - 1][1]  # where the path first reaches this ring
        rolled = np.roll(ring, -start, axis=0)
        if k in (0, last):  # the ends are walked round whole, back to where they were entered
            forward.append(np.vstack([rolled, rolled[:1]]))
            continue
        # A middle ring is entered at one vertex and left at another: half of it on the way out,
        # the other half on the way back.
        leave = (links[k][0] - start) % len(ring)
        forward.append(rolled[: leave + 1])
        backward.append(np.vstack([rolled[leave:], rolled[:1]]))
    path = np.vstack(forward + backward[::-1])
    repeated = np.r_[False, (path[1:] == path[:-1]).all(axis=1)]
    return path[~repeated]


def _nearest_first(rings: list[np.ndarray]) -> list[int]:
    """Order starting with the first ring, each next the one whose centre is nearest the last."""
    centres = np.array([ring.mean(axis=0) for ring in rings])
    order, left = [0], set(range(1, len(rings)))
    while left:
        here = centres[order[-1]]
        following = min(left, key=lambda k: float(((centres[k] - here) ** 2).sum()))
        order.append(following)
        left.remove(following)
    return order


def _nearest_vertices(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Indices (i, j) of the closest pair of vertices a[i], b[j]."""
    best, where = np.inf, (0, 0)
    rows = max(1, _PAIRS_PER_CHUNK // len(b))
    for first in range(0, len(a), rows):
        distances = ((a[first : first + rows, None, :] - b[None, :, :]) ** 2).sum(-1)
        flat = int(np.argmin(distances))
        if distances.flat[flat] < best:
            best = float(distances.flat[flat])
            where = (first + flat // len(b), flat % len(b))
    return where
