"""Masks as crops (segcli.ops.rle_crops, segcli.ops.paste_crops) against pycocotools and the full paste."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segcli.ops.paste_crops import paste_mask_crops
from segcli.ops.paste_masks import paste_masks_transposed
from segcli.ops.rle_crops import crop_to_rle, rle_counts, rle_to_crop
from segcli.writers.polygons import mask_polygons
from tests.conftest import SHARED_DATA, require


def _random_placements(seed: int, count: int):
    """Crops of every kind at every kind of place: empty, full, touching each border, one pixel,
    whole columns (runs that go on over a column break), tiny and odd image sizes."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        h, w = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        crop = rng.uniform(size=(h, w)) < rng.uniform()
        if rng.uniform() < 0.25:
            crop[:] = True
        yield crop, x0, y0, height, width


def _placed(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> np.ndarray:
    full = np.zeros((height, width), np.uint8)
    full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    return full


def test_crop_to_rle_is_pycocotools_encode_of_the_placed_mask():
    for crop, x0, y0, height, width in _random_placements(0, 3000):
        expected = mask_utils.encode(np.asfortranarray(_placed(crop, x0, y0, height, width)))
        assert crop_to_rle(crop, x0, y0, height, width) == {"size": [height, width],
                                                            "counts": expected["counts"].decode("ascii")}


def test_rle_to_crop_reads_back_exactly_the_mask_and_its_tight_rectangle():
    for crop, x0, y0, height, width in _random_placements(1, 3000):
        full = _placed(crop, x0, y0, height, width)
        rle = mask_utils.encode(np.asfortranarray(full))
        assert rle_counts(rle).sum() == height * width
        got = rle_to_crop(rle)
        assert np.array_equal(_placed(got.mask, got.x0, got.y0, height, width), full)
        if full.any():
            x, y, w, h = mask_utils.toBbox(rle)
            assert (got.x0, got.y0, got.x1, got.y1) == (int(x), int(y), int(x + w), int(y + h))
        else:
            assert got.mask.size == 0


def test_real_coco_masks_round_trip_through_crops():
    """The crowd RLEs and polygons of real COCO annotations (image-size masks of real objects)."""
    import json

    annotations = json.loads(require(SHARED_DATA / "coco_tiny" / "annotations" / "instances_val2017.json").read_text())
    images = {image["id"]: image for image in annotations["images"]}
    checked = 0
    for annotation in annotations["annotations"][:150]:
        image = images[annotation["image_id"]]
        height, width = image["height"], image["width"]
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        full = mask_utils.decode(rle)
        crop = rle_to_crop(rle)
        assert np.array_equal(_placed(crop.mask, crop.x0, crop.y0, height, width), full)
        assert crop_to_rle(crop.mask, crop.x0, crop.y0, height, width)["counts"] == mask_utils.encode(
            np.asfortranarray(full))["counts"].decode("ascii")
        # The writers trace polygons on the crop: exactly those of the full mask.
        from_crop = mask_polygons(crop.mask, 1.0, origin=(crop.x0, crop.y0))
        assert [(p.exterior, p.holes) for p in from_crop] == [(p.exterior, p.holes) for p in mask_polygons(full, 1.0)]
        checked += 1
    assert checked > 100


def test_crop_outside_the_image_is_refused():
    with pytest.raises(ValueError):
        crop_to_rle(np.ones((3, 3), bool), 8, 0, 10, 10)


def test_crop_paste_sets_exactly_the_pixels_of_the_full_paste():
    torch.manual_seed(0)
    height, width, n = 300, 420, 200
    centres = torch.rand(n, 2) * torch.tensor([width, height]) * 1.2 - 20  # some boxes past the borders
    sizes = torch.rand(n, 2) * 150 + 0.5
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    masks = torch.sigmoid(torch.randn(n, 28, 28) * 3)
    full = paste_masks_transposed(masks, boxes, height, width).permute(0, 2, 1).numpy()
    crops = paste_mask_crops(masks, boxes, height, width)
    assert len(crops) == n
    for expected, crop in zip(full, crops):
        assert np.array_equal(_placed(crop.mask, crop.x0, crop.y0, height, width), expected)
        assert crop.mask.size == 0 or (crop.mask.any(axis=0)[[0, -1]].all() and crop.mask.any(axis=1)[[0, -1]].all())


def test_crop_paste_of_a_huge_object_is_striped_and_still_exact(monkeypatch):
    import segcli.ops.paste_crops as paste_crops

    monkeypatch.setattr(paste_crops, "STRIPE_ELEMENTS", 5000)  # many stripes on a small image
    torch.manual_seed(1)
    boxes = torch.tensor([[3.0, 5.0, 250.0, 190.0], [100.0, 20.0, 101.0, 22.0]])
    masks = torch.sigmoid(torch.randn(2, 28, 28) * 3)
    full = paste_masks_transposed(masks, boxes, 200, 256).permute(0, 2, 1).numpy()
    for expected, crop in zip(full, paste_mask_crops(masks, boxes, 200, 256)):
        assert np.array_equal(_placed(crop.mask, crop.x0, crop.y0, 200, 256), expected)


def test_crop_at_the_far_corner_of_a_huge_image():
    """The last pixel of a 10,000 x 10,000 image (the largest run indices; no trailing zeros)."""
    height, width = 10_000, 10_000
    crop = np.zeros((40, 30), bool)
    crop[5:40, 2:30] = True
    rle = crop_to_rle(crop, width - 30, height - 40, height, width)
    assert mask_utils.area(rle) == crop.sum()
    back = rle_to_crop(rle)
    assert (back.x0, back.y0, back.x1, back.y1) == (width - 28, height - 35, width, height)


def test_area_of_more_than_255_masks():
    """pycocotools 2.0.11's area() fails for more than 255 RLEs in one call under NumPy 2; a huge
    image easily has that many instances."""
    from segcli.ops.rle import rle_area

    masks = np.zeros((300, 20, 10), bool)
    for k in range(300):
        masks[k, : k % 20 + 1, : k % 10 + 1] = True
    rles = [mask_utils.encode(np.asfortranarray(m.T.astype(np.uint8))) for m in masks]
    assert rle_area(rles).tolist() == [int(m.sum()) for m in masks]


def test_cpu_predictor_rles_equal_the_full_paste_encoding():
    """predict on the CPU encodes each mask from the crop around its box: the RLEs must be those of
    the image-size paste (what the GPU path and torchvision's paste give), with masks_above too."""
    from pathlib import Path

    from segcli.data.decode import Decoded
    from segcli.data.sources import InputItem
    from segcli.ops.rle import encode_masks
    from segcli.predict.core import Predictor, collate
    from tests.conftest import synthetic_shapes

    shapes = synthetic_shapes()
    image = np.ascontiguousarray(shapes.make_image(np.random.default_rng(3), 256)[0][:, :230])  # not square
    predictor = Predictor.load("shapes_demo", None, "cpu", "fp32", 0.05, 100, progress=False)
    batch, sizes = collate([image])
    detections = predictor.model(batch, sizes)
    assert len(detections.scores) >= 3  # several masks, so the comparison means something
    full = encode_masks(detections.paste_masks(0).numpy())
    decoded = Decoded(item=InputItem(Path("scene.png"), "scene.png"), index=0, image=image, error=None)
    assert predictor._image_result(detections, 0, decoded).rles == full
    predictor.masks_above = float(detections.scores[len(full) // 2])
    masked = int((detections.scores.numpy() > predictor.masks_above).sum())
    rles = predictor._image_result(detections, 0, decoded).rles
    assert rles[:masked] == full[:masked] and all(r["counts"] == rles[-1]["counts"] for r in rles[masked:])
