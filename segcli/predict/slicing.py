"""Sliced inference for images far larger than the model's input (`--slice`, `--overlap`).

A model that resizes every image to about 800 pixels sees a 10,000-pixel drone photo at a twelfth
of its resolution, and small objects vanish. Sliced, the image runs as overlapping tiles at (close
to) full resolution, in batches of `--batch-size` tiles, plus one downscaled pass over the whole
image that finds objects larger than a tile. Detections of all windows are merged
(segcli.predict.slice_merge): an object cut by a seam becomes one instance.

Memory stays bounded by the image and one batch of tiles: masks are pasted into crops around
their objects (segcli.ops.paste_crops), kept as crop RLEs, and placed into image-size RLEs without
an image-size array (segcli.ops.rle_crops). The whole-image pass is shrunk on the CPU before it
reaches the model, so the model never normalizes a full-size float copy of a huge image.

Which images are sliced:
- `--slice auto` (the default): an image the model would shrink more than `AUTO_FACTOR` times
  (per side) to fit its input size. Tiles are the model's own input size (`min_size`: 800 for the
  COCO models, 256 for the demo model), so each tile runs at full resolution.
- `--slice N`: every image larger than N pixels in width or height, with N x N tiles.
- `--slice off`: none (every image runs whole, as without this feature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segcli.predict.slice_merge import MATCHES, MERGES, WHOLE_IMAGE, Piece, merge_pieces
from segcli.errors import UsageError
from segcli.ops.paste_crops import paste_mask_crops
from segcli.ops.rle_crops import MaskCrop

AUTO_FACTOR = 4.0
"""`--slice auto` slices an image when the model would shrink it by more than this per side."""
MIN_TILE = 64
MAX_OVERLAP = 0.9  # above it the tile count explodes (100 tiles where 1 would do)


@dataclass(frozen=True)
class SliceSettings:
    """How huge images are cut, run and merged; `tile` None is `--slice auto`."""

    tile: int | None = None
    overlap: float = 0.2  # fraction of the tile shared by neighbouring tiles (at least)
    merge: str = "nmm"  # segcli.predict.slice_merge.MERGES
    match: str = "iou"  # segcli.predict.slice_merge.MATCHES
    match_threshold: float = 0.5
    whole_image: bool = True  # also run the whole image, downscaled, for objects larger than a tile

    @classmethod
    def of(cls, options: Any) -> SliceSettings | None:
        """The settings of PredictOptions (`slice`, `overlap`, `slice_merge`, `slice_match`,
        `slice_match_thr`, `slice_whole`); None for `--slice off`; UsageError for a bad value."""
        return cls.parse(options.slice, options.overlap, options.slice_merge, options.slice_match,
                         options.slice_match_thr, options.slice_whole)

    @classmethod
    def parse(cls, slice_: str, overlap: float, merge: str, match: str, match_threshold: float,
              whole_image: bool) -> SliceSettings | None:
        """The settings from the command line's values, None for `--slice off`; UsageError if bad."""
        spec = str(slice_).strip().lower()
        if spec in ("off", "0", "none", "no"):
            return None
        if spec == "auto":
            tile = None
        else:
            try:
                tile = int(spec)
            except ValueError:
                raise UsageError(f"--slice {slice_!r}: give a tile size in pixels (e.g. 1024), auto or off") from None
            if tile < MIN_TILE:
                raise UsageError(f"--slice must be at least {MIN_TILE} pixels, got {tile}")
        if not 0.0 <= overlap <= MAX_OVERLAP or math.isnan(overlap):
            raise UsageError(f"--overlap must be between 0 and {MAX_OVERLAP} (a fraction of the tile), got {overlap}")
        if merge not in MERGES:
            raise UsageError(f"--slice-merge {merge!r}: choose {' or '.join(MERGES)}")
        if match not in MATCHES:
            raise UsageError(f"--slice-match {match!r}: choose {' or '.join(MATCHES)}")
        if not 0.0 < match_threshold <= 1.0:
            raise UsageError(f"--slice-match-thr must be above 0 and at most 1, got {match_threshold}")
        return cls(tile, float(overlap), merge, match, float(match_threshold), bool(whole_image))

    def fingerprint(self) -> dict:
        """What --resume compares (segcli.predict.fingerprint)."""
        return {"tile": self.tile or "auto", "overlap": self.overlap, "merge": self.merge, "match": self.match,
                "match_thr": self.match_threshold, "whole_image": self.whole_image}

    def tile_for(self, height: int, width: int, resize: Any) -> int | None:
        """The tile size to slice an image of this size with, or None to run it whole.

        `resize` is the model's ResizePolicy (min_size, max_size, output_size)."""
        if self.tile is not None:
            return self.tile if max(height, width) > self.tile else None
        resized_h, _ = resize.output_size(height, width)
        return int(resize.min_size) if height / max(resized_h, 1) > AUTO_FACTOR else None


def tile_windows(height: int, width: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Tiles (x0, y0, x1, y1) covering the image, row by row: all the same size (min(tile, side)),
    so they batch as one input size; spread evenly, so neighbours share at least `overlap` of a tile."""
    xs = _starts(width, tile, overlap)
    ys = _starts(height, tile, overlap)
    tw, th = min(tile, width), min(tile, height)
    return [(x, y, x + tw, y + th) for y in ys for x in xs]


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    if length <= tile:
        return [0]
    step = max(1, tile - int(round(overlap * tile)))
    count = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


class SlicedPredictor:
    """A Predictor (segcli.predict.core) that slices the images `settings` says are too large;
    other images, and every other attribute, go to the wrapped predictor unchanged.

    `keep_thr`: when the model runs below the run's `--score-thr` (candidates for --track and
    --review, segcli.predict.candidates), the pieces above it and those below are merged apart, so
    that a candidate never joins a kept detection: what is kept is what a run without them keeps."""

    def __init__(self, predictor: Any, settings: SliceSettings, max_det: int, batch_size: int | None = None,
                 keep_thr: float | None = None) -> None:
        self.predictor = predictor
        self.settings = settings
        self.max_det = max_det
        self.keep_thr = keep_thr
        # As the run batches images: 8 tiles per forward pass on a GPU, 1 on a CPU.
        self.tile_batch = batch_size or (8 if predictor.device.type == "cuda" else 1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.predictor, name)

    def predict(self, decoded: list) -> list:
        """Like Predictor.predict: one ImagePrediction per decoded image, in order."""
        tiles = [self.settings.tile_for(*d.image.shape[:2], self.predictor.model.resize) for d in decoded]
        whole = [i for i, tile in enumerate(tiles) if tile is None]
        results: list = [None] * len(decoded)
        if whole:
            for i, result in zip(whole, self.predictor.predict([decoded[i] for i in whole])):
                results[i] = result
        for i, tile in enumerate(tiles):
            if tile is not None:
                results[i] = self.predict_sliced(decoded[i], tile)
        return results

    def predict_sliced(self, decoded: Any, tile: int) -> Any:
        """One image as tiles of `tile` pixels (and the whole-image pass), merged."""
        from segcli.predict.core import ImagePrediction

        image = decoded.image
        height, width = image.shape[:2]
        windows = tile_windows(height, width, tile, self.settings.overlap)
        pieces: list[Piece] = []
        for start in range(0, len(windows), self.tile_batch):
            chunk = windows[start:start + self.tile_batch]
            detections = self._run([image[y0:y1, x0:x1] for x0, y0, x1, y1 in chunk])
            for k, window in enumerate(chunk):
                pieces += self._pieces(detections, k, start + k, window, (height, width))
        if self.settings.whole_image:
            pieces += self._whole_image_pieces(image)
        if self.keep_thr is None:
            merged = self._merge(pieces, height, width)
        else:
            kept = [p.score > np.float32(self.keep_thr) for p in pieces]
            merged = (self._merge([p for p, k in zip(pieces, kept) if k], height, width)
                      + self._merge([p for p, k in zip(pieces, kept) if not k], height, width))
        merged = merged[: self.max_det]
        return ImagePrediction(
            item=decoded.item,
            width=width,
            height=height,
            boxes=np.array([m.box for m in merged], np.float32).reshape(-1, 4),
            scores=np.array([m.score for m in merged], np.float32),
            category_ids=np.array([m.category_id for m in merged], np.int64),
            rles=[m.rle for m in merged],
            frame=decoded.frame,
            timestamp=decoded.timestamp,
        )

    def _merge(self, pieces: list[Piece], height: int, width: int) -> list:
        return merge_pieces(pieces, (height, width), self.settings.merge, self.settings.match,
                            self.settings.match_threshold) if pieces else []

    def _run(self, images: list[np.ndarray]):
        from segcli.predict.core import collate

        device = self.predictor.device
        batch, sizes = collate(images, pin=device.type == "cuda")
        return self.predictor.model(batch.to(device, non_blocking=True), sizes)

    def _pieces(self, detections: Any, index: int, source: int, window: tuple[int, int, int, int],
                image_size: tuple[int, int], scale: tuple[float, float] = (1.0, 1.0)) -> list[Piece]:
        """Image `index` of a batch run on `window` (scaled by `scale` = image / input pixels) as pieces."""
        rows = detections.rows(index)
        categories = self.predictor.label_to_category[detections.labels[rows].cpu()]
        keep = torch.ones(len(rows), dtype=torch.bool)
        if self.predictor.category_ids is not None:  # exported models: --classes after the fact
            keep = torch.isin(categories, self.predictor.category_ids)
        x0, y0 = window[:2]
        boxes = detections.boxes[rows].float().cpu()[keep]
        boxes = boxes * torch.tensor([scale[0], scale[1], scale[0], scale[1]]) + torch.tensor([x0, y0, x0, y0])
        crops = paste_mask_crops(detections.mask_probs[rows][keep], boxes - torch.tensor([x0, y0, x0, y0]),
                                 window[3] - y0, window[2] - x0)
        scores = detections.scores[rows].float().cpu()[keep]
        pieces = []
        for box, score, category, crop in zip(boxes.numpy(), scores.tolist(), categories[keep].tolist(), crops):
            placed = MaskCrop(crop.mask, crop.x0 + x0, crop.y0 + y0, image_size)
            pieces.append(Piece.from_crop(source, window, box, score, category, placed))
        return pieces

    def _whole_image_pieces(self, image: np.ndarray) -> list[Piece]:
        """The whole image, shrunk here to the model's input size (area averaging), as pieces with
        masks pasted at full resolution."""
        import cv2

        height, width = image.shape[:2]
        small_h, small_w = self.predictor.model.resize.output_size(height, width)
        if small_h >= height:  # not larger than the model's input: the model resizes it itself
            small_h, small_w, small = height, width, image
        else:
            small = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA)
        detections = self._run([small])
        return self._pieces(detections, 0, WHOLE_IMAGE, (0, 0, width, height), (height, width),
                            scale=(width / small_w, height / small_h))
