"""Merge the detections of overlapping tiles into one set of instances per image.

Every detection ("piece") knows the window the model saw when it found it: its tile, or the whole
image for the downscaled whole-image pass, and whether its tile cut it (its mask or box reaches an
edge of the tile inside the image). Two pieces of different windows are the same object when
their masks agree where both tell what the object is: a cut piece only inside its window, a piece
its tile saw whole everywhere (pixels of the other piece beyond that tile then count against
them). The IoU (or IoS, intersection over the smaller) of the two masks clipped to that region must
reach the threshold. Measured there, an object cut by a seam matches its other part with an IoU
near 1 whatever its size, neighbours that only touch do not match, and with IoU an object resting
on a larger one (a bag on a person) does not vanish into it the way box IoS would make it. Pieces
of the same window are never merged: the model's own NMS already kept them apart.

Groups grow greedily, best score first: a group takes, from each window it has no piece of yet,
the first unassigned piece (of the seed's class first, then by score) that matches one of its
pieces, so an object cut by several seams becomes one instance. Matching is class-agnostic (tiles
may name a cut object differently); the group's best piece gives score and category. Its mask and
box are:

- `nmm` (non-maximum merging, the default): those of the best piece whose tile holds every piece of
  the group, i.e. that saw the whole object, exact at full resolution; if none did (an object
  larger than a tile), the union of all pieces (the whole-image pass included) and of their boxes.
- `nms`: those of the best piece alone.

The model may also name one object twice (per-class NMS: a ring and a circle). Pairing tiles'
guesses by class keeps one instance per class, as unsliced; a group that only repeats an instance
already made, from partial views (cut pieces, the coarse whole-image pass), is dropped rather than
kept as a fragment beside it (`_Grouping._second_guess`).

Masks stay small: a piece holds the RLE of the crop around its mask; matching decodes two crops,
merging builds the union crop of one group at a time, and the result is placed into an image-size
RLE without an image-size array (segcli.ops.rle_crops).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from segcli.ops.rle_crops import MaskCrop, crop_to_rle

MERGES = ("nmm", "nms")
MATCHES = ("iou", "ios")
WHOLE_IMAGE = -1  # `source` of pieces found by the whole-image pass
EDGE_PIXELS, EDGE_FRACTION = 2, 0.05  # see _edge_margin
UNASSIGNED, DROPPED = -1, -2
DECODED_BUDGET = 256 << 20  # bytes of decoded crops kept while merging one image
CELL = 256  # pixels: the grid that finds pieces near a piece


@dataclass
class Piece:
    """One detection of one window, in image coordinates."""

    source: int  # tile index, or WHOLE_IMAGE
    window: tuple[int, int, int, int]  # x0, y0, x1, y1: the part of the image the model saw
    box: np.ndarray  # [4] xyxy
    score: float
    category_id: int
    rect: tuple[int, int, int, int]  # x0, y0, x1, y1 of the mask's pixels (empty mask: x0 == x1)
    crop_rle: dict | None  # pycocotools RLE of the [h, w] crop at rect (None: empty mask)
    cut: bool  # its mask or box reaches an edge of its tile inside the image
    area: int = 0  # foreground pixels

    @property
    def reach(self) -> tuple[int, int, int, int]:
        """Where the piece tells what the object is: a piece its window saw whole claims the whole
        object (pixels of another piece outside its window disagree with it); a cut one only its window."""
        return self.window if self.cut else (0, 0, 1 << 40, 1 << 40)

    @classmethod
    def from_crop(cls, source: int, window: tuple[int, int, int, int], box: np.ndarray, score: float,
                  category_id: int, crop: MaskCrop) -> Piece:
        rect = (crop.x0, crop.y0, crop.x1, crop.y1)
        # The box of a cut object runs to the tile's edge (boxes are clipped to it) even where its
        # mask stops a few pixels short, so either one reaching an inner edge means cut.
        box = np.asarray(box, np.float64)
        cut = crop.mask.size > 0 and (_at_inner_edge(rect, window, crop.image_size)
                                      or _at_inner_edge(tuple(box), window, crop.image_size))
        encoded = mask_utils.encode(np.asfortranarray(crop.mask, dtype=np.uint8)) if crop.mask.size else None
        return cls(source, window, box, float(score), int(category_id), rect, encoded, bool(cut),
                   int(np.count_nonzero(crop.mask)))

    def mask(self) -> np.ndarray:
        """The [h, w] bool crop at `rect`."""
        if self.crop_rle is None:
            return np.zeros((0, 0), bool)
        return mask_utils.decode(self.crop_rle).astype(bool)


@dataclass
class Merged:
    """One instance of the image: image-size RLE and the group's best score and category."""

    box: np.ndarray  # [4] xyxy
    score: float
    category_id: int
    rle: dict  # {"size": [H, W], "counts": str}
    pieces: int  # how many detections it was made of


def merge_pieces(pieces: list[Piece], image_size: tuple[int, int], merge: str = "nmm", match: str = "iou",
                 threshold: float = 0.5) -> list[Merged]:
    """Group matching pieces (see the module docstring) and merge each group; best score first."""
    if merge not in MERGES or match not in MATCHES:
        raise ValueError(f"merge {merge!r} / match {match!r}")
    return _Grouping(pieces, match, threshold).instances(image_size, merge)


class _Grouping:
    """The pieces of one image, their order (best score first) and the group each belongs to."""

    def __init__(self, pieces: list[Piece], match: str, threshold: float) -> None:
        self.pieces, self.match, self.threshold = pieces, match, threshold
        self.order = sorted(range(len(pieces)), key=lambda i: (-pieces[i].score, pieces[i].source, i))
        self.rank = np.empty(len(pieces), np.int64)
        self.rank[self.order] = np.arange(len(pieces))
        self.rects = np.array([p.rect for p in pieces], np.int64).reshape(-1, 4)
        self.reaches = np.array([p.reach for p in pieces], np.int64).reshape(-1, 4)
        self.sources = np.array([p.source for p in pieces], np.int64)
        self.categories = np.array([p.category_id for p in pieces], np.int64)
        self.group_of = np.full(len(pieces), UNASSIGNED)  # index of the instance, or UNASSIGNED / DROPPED
        self.masks = _CropCache(pieces)
        self.cells: dict[tuple[int, int], list[int]] = {}  # grid cell -> pieces whose masks reach into it
        for i, (x0, y0, x1, y1) in enumerate(self.rects.tolist()):
            for cell in _cells((x0, y0, x1, y1)):
                self.cells.setdefault(cell, []).append(i)

    def instances(self, image_size: tuple[int, int], merge: str) -> list[Merged]:
        merged: list[Merged] = []
        for seed in self.order:
            if self.group_of[seed] != UNASSIGNED:
                continue
            group = self._grow(seed, len(merged))
            if self._second_guess(group, len(merged)):
                self.group_of[group] = DROPPED
                continue
            members = [self.pieces[i] for i in sorted(group, key=lambda i: self.rank[i])]
            merged.append(_merge_group(members, self.masks, image_size, merge))
        return merged

    def _grow(self, seed: int, label: int) -> list[int]:
        """The seed and every piece of another window that matches a piece of the group, one per window."""
        self.group_of[seed] = label
        group, seen, frontier = [seed], {self.pieces[seed].source}, [seed]
        # The model may name one object twice (per-class NMS); tiles' guesses of the seed's class
        # go together first, so the other guesses line up into their own instance, as unsliced.
        preference = np.where(self.categories == self.pieces[seed].category_id, 0, len(self.pieces)) + self.rank
        while frontier:
            a = frontier.pop()
            eligible = (self.group_of == UNASSIGNED) & (self.sources != self.sources[a])
            for b in self._meeting(a, eligible, preference):
                if self.pieces[b].source not in seen and self._matches(a, b):
                    self.group_of[b] = label
                    group.append(b)
                    seen.add(self.pieces[b].source)
                    frontier.append(b)
        return group

    def _second_guess(self, group: list[int], label: int) -> bool:
        """Whether a group repeats an instance already made, as the model's second guess at it (another
        class), or a guess at part of it. Kept, it would be a fragment or a coarse copy beside it:

        - partial views only (cut pieces, the downscaled whole-image pass), each matching a piece
          of an earlier instance;
        - or one cut piece that no other tile confirms, lying in a piece of an earlier instance
          (`threshold` of its pixels there)."""
        if not all(self.pieces[i].cut or self.pieces[i].source == WHOLE_IMAGE for i in group):
            return False
        made = (self.group_of >= 0) & (self.group_of < label)
        test = self._lies_in if len(group) == 1 and self.pieces[group[0]].cut else self._matches
        return all(any(test(i, q) for q in self._meeting(i, made, self.rank)) for i in group)

    def _meeting(self, a: int, eligible: np.ndarray, order: np.ndarray) -> list[int]:
        """Eligible pieces whose masks' rectangles meet piece a's inside both reaches, by `order`."""
        near = np.unique(np.fromiter((i for cell in _cells(tuple(self.rects[a].tolist()))
                                      for i in self.cells.get(cell, ())), np.int64))
        near = near[eligible[near]]
        rects, reaches = self.rects[near], self.reaches[near]
        lo = np.maximum(np.maximum(self.rects[a, :2], rects[:, :2]), np.maximum(self.reaches[a, :2], reaches[:, :2]))
        hi = np.minimum(np.minimum(self.rects[a, 2:], rects[:, 2:]), np.minimum(self.reaches[a, 2:], reaches[:, 2:]))
        found = near[(hi > lo).all(axis=1)]
        return found[np.argsort(order[found], kind="stable")].tolist()

    def _lies_in(self, a: int, b: int) -> bool:
        inter, area_a, _ = _overlap(self.pieces[a], self.pieces[b], self.masks)
        return inter > 0 and inter / area_a >= self.threshold

    def _matches(self, a: int, b: int) -> bool:
        inter, area_a, area_b = _overlap(self.pieces[a], self.pieces[b], self.masks)
        if inter == 0:
            return False
        return inter / (min(area_a, area_b) if self.match == "ios" else area_a + area_b - inter) >= self.threshold


def _overlap(a: Piece, b: Piece, masks: _CropCache) -> tuple[int, int, int]:
    """(intersection, area of a, area of b) of the two masks, where both tell (`Piece.reach`)."""
    shared = _meet(a.reach, b.reach)
    both = _meet(_meet(a.rect, b.rect), shared)
    if both[2] <= both[0] or both[3] <= both[1]:
        return 0, 0, 0
    mask_a, mask_b = masks.get(a), masks.get(b)
    inter = int(np.count_nonzero(_view(mask_a, a.rect, both) & _view(mask_b, b.rect, both)))
    return inter, _area_in(a, mask_a, shared), _area_in(b, mask_b, shared)


def _meet(r: tuple[int, int, int, int], s: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Intersection of two x0, y0, x1, y1 rectangles (empty: x1 <= x0 or y1 <= y0)."""
    return max(r[0], s[0]), max(r[1], s[1]), min(r[2], s[2]), min(r[3], s[3])


def _area_in(piece: Piece, mask: np.ndarray, region: tuple[int, int, int, int]) -> int:
    """Foreground pixels of a piece inside region (mask: its decoded crop)."""
    inside = _meet(piece.rect, region)
    if inside == piece.rect:
        return piece.area
    if inside[2] <= inside[0] or inside[3] <= inside[1]:
        return 0
    return int(np.count_nonzero(_view(mask, piece.rect, inside)))


def _view(mask: np.ndarray, rect: tuple[int, int, int, int], region: tuple[int, int, int, int]) -> np.ndarray:
    """The part of a crop at rect that covers region (region lies inside rect)."""
    return mask[region[1] - rect[1]:region[3] - rect[1], region[0] - rect[0]:region[2] - rect[0]]


def _merge_group(group: list[Piece], masks: _CropCache, image_size: tuple[int, int], merge: str) -> Merged:
    """One instance from a group (best piece first): see the module docstring for which pieces
    give its mask and box."""
    best = group[0]
    if merge == "nms":
        chosen = [best]
    else:
        # A cut piece did not see the whole object, even where the others lie inside its window up
        # to the edge margin: chosen (it may score best), its mask lacks the part beyond its tile's
        # edge (found by the property test in tests/test_properties.py: a 2-pixel object 1 pixel
        # over a tile's edge came out as 1 pixel).
        saw_all = (p for p in group if p.source != WHOLE_IMAGE and not p.cut
                   and all(_inside(q.rect, p.window) for q in group))
        chosen = next(([p] for p in saw_all), group)
    box = np.concatenate([np.min([p.box[:2] for p in chosen], axis=0), np.max([p.box[2:] for p in chosen], axis=0)])
    drawn = [p for p in chosen if p.crop_rle is not None]
    rect = (min((p.rect[0] for p in drawn), default=0), min((p.rect[1] for p in drawn), default=0),
            max((p.rect[2] for p in drawn), default=0), max((p.rect[3] for p in drawn), default=0))
    union = np.zeros((rect[3] - rect[1], rect[2] - rect[0]), bool)
    for piece in drawn:
        _view(union, rect, piece.rect)[...] |= masks.get(piece)
    height, width = image_size
    return Merged(box, best.score, best.category_id, crop_to_rle(union, rect[0], rect[1], height, width), len(group))


def _cells(rect: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """The grid cells a rectangle covers (none for an empty one)."""
    x0, y0, x1, y1 = rect
    if x1 <= x0 or y1 <= y0:
        return []
    return [(cx, cy) for cx in range(x0 // CELL, (x1 - 1) // CELL + 1) for cy in range(y0 // CELL, (y1 - 1) // CELL + 1)]


def _edge_margin(rect: tuple) -> float:
    """How near a mask may come to a tile's edge and still count as reaching it: a mask the model
    cut a pixel or two short belongs to an object that goes on (5% of the mask's size is about
    1.4 cells of the 28 x 28 mask head's grid)."""
    return max(EDGE_PIXELS, EDGE_FRACTION * max(rect[2] - rect[0], rect[3] - rect[1]))


def _at_inner_edge(rect: tuple, window: tuple[int, int, int, int], image_size: tuple[int, int]) -> bool:
    """Whether a rectangle comes within its edge margin of an edge of the window that is not an edge
    of the image."""
    height, width = image_size
    margin = _edge_margin(rect)
    return bool((window[0] > 0 and rect[0] - window[0] < margin) or (window[1] > 0 and rect[1] - window[1] < margin)
                or (window[2] < width and window[2] - rect[2] < margin)
                or (window[3] < height and window[3] - rect[3] < margin))


def _inside(rect: tuple[int, int, int, int], window: tuple[int, int, int, int]) -> bool:
    """Whether a mask's rectangle lies in a window, up to its edge margin (empty masks do)."""
    if rect[2] <= rect[0] or rect[3] <= rect[1]:
        return True
    margin = _edge_margin(rect)
    return (rect[0] > window[0] - margin and rect[1] > window[1] - margin
            and rect[2] < window[2] + margin and rect[3] < window[3] + margin)


class _CropCache:
    """Decoded crops, the most recently used first, up to `budget` bytes: groups form in score
    order, all over the image, so a small cache would decode the same crops again and again."""

    def __init__(self, pieces: list[Piece], budget: int = DECODED_BUDGET) -> None:
        self._ids = {id(p): i for i, p in enumerate(pieces)}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._budget, self._bytes = budget, 0

    def get(self, piece: Piece) -> np.ndarray:
        key = self._ids[id(piece)]
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        mask = piece.mask()
        self._cache[key] = mask
        self._bytes += mask.nbytes
        while self._bytes > self._budget and len(self._cache) > 1:
            self._bytes -= self._cache.popitem(last=False)[1].nbytes
        return mask
