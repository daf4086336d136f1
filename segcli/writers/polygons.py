"""Instance masks to polygons: every part of a mask, with its holes, valid, in pixel coordinates.

Coordinates are continuous image coordinates: the image spans [0, W] x [0, H] and pixel (col, row)
is the square [col, col+1] x [row, row+1] (the COCO bbox convention). OpenCV traces contours
through the centres of boundary pixels; those polygons are grown by half a pixel (mitred), which
gives the outline of the pixel squares themselves, so one-pixel-wide parts keep their area and
re-rasterized polygons match the mask. Each ring is simplified before growing (Douglas-Peucker on
the centre line, topology preserved, so the result stays valid) with `tolerance` pixels, capped at
2% of the part's size: a fixed tolerance would eat a tenth of a 15-pixel object, and with the cap
re-rasterized polygons keep an IoU of at least 0.95 with their masks (tested on real COCO masks).

That is the outline pycocotools rasterizes back (COCO, GeoJSON). YOLO and LabelMe readers rasterize
the other way: Ultralytics, supervision and LabelMe fill polygons with `cv2.fillPoly` or Pillow,
which take a vertex (x, y) as the centre of pixel column x, row y and paint every pixel the
outline touches, so a pixel-edge outline comes back a pixel wider and taller. For them
`pixel_centres=True` keeps the simplified centre line itself, in pixel indices (what
`cv2.findContours` gives those tools); a part whose centres enclose no area (a single pixel, a
one-pixel-wide line) is then too small to be a polygon and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient

_MITRE = 2  # shapely's join_style for sharp corners: pixel outlines are axis-aligned
RELATIVE_TOLERANCE = 0.02
"""Simplification never moves an edge by more than 2% of the part's size (sqrt of its area)."""


@dataclass
class MaskPolygon:
    """One connected part of a mask: its outer ring and its holes, each a list of (x, y)."""

    exterior: list[tuple[float, float]]
    holes: list[list[tuple[float, float]]]

    def flat_exterior(self) -> list[float]:
        """[x1, y1, x2, y2, ...] without the closing repeat: COCO, YOLO and LabelMe style."""
        return [round(v, 2) for point in self.exterior[:-1] for v in point]


def mask_polygons(mask: np.ndarray, tolerance: float = 1.0, pixel_centres: bool = False,
                  origin: tuple[int, int] = (0, 0)) -> list[MaskPolygon]:
    """Polygons of an [H, W] binary mask: one per connected part (8-connected), largest first.

    Holes are kept; parts inside holes are parts of their own. Every polygon is valid (shapely)
    and oriented with a counter-clockwise exterior (in x-right, y-up terms). An empty mask gives [].
    `pixel_centres`: the outline through the boundary pixels' centres instead of around their
    edges, for readers that rasterize with `cv2.fillPoly` (see the module docstring). `origin`
    (x, y) places a crop of a larger mask: the result is that of the larger mask.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    geometry = mask_geometry(mask, tolerance, pixel_centres, origin)
    parts = list(geometry.geoms) if isinstance(geometry, MultiPolygon) else [geometry] if not geometry.is_empty else []
    parts.sort(key=lambda p: -p.area)
    return [
        MaskPolygon([(float(x), float(y)) for x, y in p.exterior.coords],
                    [[(float(x), float(y)) for x, y in ring.coords] for ring in p.interiors])
        for p in parts
    ]


def mask_geometry(mask: np.ndarray, tolerance: float = 1.0, pixel_centres: bool = False,
                  origin: tuple[int, int] = (0, 0)) -> Polygon | MultiPolygon:
    """The mask as one valid shapely (Multi)Polygon; see `mask_polygons`."""
    binary = np.ascontiguousarray(np.asarray(mask) != 0, dtype=np.uint8)
    if binary.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {binary.shape}")
    if not binary.any():
        return Polygon()
    # Crop to the mask's bounding box: contour tracing then costs the mask, not the image.
    rows = np.flatnonzero(binary.any(axis=1))
    cols = np.flatnonzero(binary.any(axis=0))
    top, left = int(rows[0]), int(cols[0])
    crop = np.pad(binary[top : rows[-1] + 1, left : cols[-1] + 1], 1)
    contours, hierarchy = cv2.findContours(crop, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    # Undo the crop and pad (and place a crop at its origin). Pixel centres lie at +0.5 in image
    # coordinates; the centre-line outline is given in pixel indices instead (x = column), as
    # fillPoly and Pillow read it.
    offset = np.array([origin[0] + left - 1, origin[1] + top - 1]) + (0.0 if pixel_centres else 0.5)
    rings = [c.reshape(-1, 2).astype(np.float64) + offset for c in contours]
    pieces = []
    for i, ring in enumerate(rings):
        if hierarchy[0][i][3] != -1:
            continue  # a hole: added with its outer ring below
        holes = [rings[j] for j in range(len(rings)) if hierarchy[0][j][3] == i]
        if not pixel_centres:
            pieces.append(_grown(ring, holes, tolerance))
        elif len(ring) >= 3:  # fewer points enclose nothing: a pixel or a straight run
            pieces.append(_simplified(ring, holes, tolerance))
    # Growing parts that touch diagonally merges them; simplifying again only drops collinear points.
    geometry = shapely.unary_union(pieces).simplify(0.01, preserve_topology=True)
    if not geometry.is_valid:  # not expected after buffer + topology-preserving simplify; be safe
        geometry = shapely.make_valid(geometry)
    return _oriented(_polygons_only(geometry))


def _grown(exterior: np.ndarray, holes: list[np.ndarray], tolerance: float):
    """Simplify a pixel-centre ring (with holes), then grow it by half a pixel into the outline of
    its pixels. Simplifying the centre line, not the grown staircase, keeps the outline on the
    pixel edges: pixels whose centres are inside stay inside."""
    if len(exterior) < 3:  # a single pixel or a straight run: a point or a line
        line = shapely.LineString(exterior) if len(exterior) > 1 else shapely.Point(exterior[0])
        return line.buffer(0.5, cap_style=3, join_style=_MITRE)
    polygon = _simplified(exterior, holes, tolerance)
    grown = polygon.buffer(0.5, join_style=_MITRE, mitre_limit=2.0)
    # The ring itself also covers its pixels where the polygon is thinner than a pixel.
    ring = np.asarray(polygon.exterior.coords) if isinstance(polygon, Polygon) and not polygon.is_empty else exterior
    outline = shapely.LineString(np.vstack([ring, ring[:1]])).buffer(0.5, cap_style=3, join_style=_MITRE)
    result = shapely.union(grown, outline)
    # A ring one pixel wide traces its hole along the same pixel centres as its outside: the polygon
    # of both is invalid, make_valid drops the hole, and the hole's pixels came out filled. Cut
    # such lost holes out here, shrunk by the same half pixel the valid polygon's holes shrink by.
    holes = [hole for hole in holes if len(hole) >= 3 and Polygon(hole).area > 0]
    if _hole_count(polygon) < len(holes):
        for hole in holes:
            result = result.difference(Polygon(hole).buffer(-0.5, join_style=_MITRE, mitre_limit=2.0))
    return result


def _hole_count(geometry) -> int:
    if isinstance(geometry, Polygon):
        return len(geometry.interiors)
    return sum(_hole_count(part) for part in getattr(geometry, "geoms", []))


def _simplified(exterior: np.ndarray, holes: list[np.ndarray], tolerance: float):
    """The pixel-centre ring (with holes) as a valid polygon, simplified by `tolerance` pixels at most."""
    polygon = Polygon(exterior, [h for h in holes if len(h) >= 3])
    # Each simplified edge may sit up to `tolerance` off the outline, which costs a small part a
    # large share of its area: cap it at a fraction of the part's size (see module docstring).
    tolerance = min(tolerance, RELATIVE_TOLERANCE * float(np.sqrt(len(exterior) + abs(Polygon(exterior).area))))
    if tolerance > 0:
        polygon = polygon.simplify(tolerance, preserve_topology=True)
    if not polygon.is_valid:  # zero-width necks traced twice: make_valid sorts them out
        polygon = shapely.make_valid(polygon)
    return polygon


def _polygons_only(geometry) -> Polygon | MultiPolygon:
    if isinstance(geometry, (Polygon, MultiPolygon)):
        return geometry
    parts = [g for g in getattr(geometry, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    flat = [p for g in parts for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
    return MultiPolygon(flat) if flat else Polygon()


def _oriented(geometry: Polygon | MultiPolygon) -> Polygon | MultiPolygon:
    if geometry.is_empty:
        return geometry
    if isinstance(geometry, Polygon):
        return orient(geometry, 1.0)
    return MultiPolygon([orient(p, 1.0) for p in geometry.geoms if not p.is_empty])
