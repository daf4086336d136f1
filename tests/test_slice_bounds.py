"""`--slice` and its companions at the edges of what they accept (the refusals just past them are in
test_slicing.py): the smallest tile with the largest overlap, no overlap, a tile larger than the
image, tiles on images one pixel thin, the strictest match threshold. Each runs through the CLI
with the shipped demo model and must give a valid output: exit 0, no traceback, every box inside
its image, every mask of the image's size, no instance twice."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from segcli.cli import app
from segcli.predict.slicing import MAX_OVERLAP, MIN_TILE, tile_windows
from tests.conftest import synthetic_shapes


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bounds")
    rng = np.random.default_rng(7)
    shapes = synthetic_shapes()
    made = {}
    for name, size in {"shapes": 160, "small": 100}.items():
        image, _ = shapes.make_image(rng, size)
        made[name] = folder / f"{name}.png"
        cv2.imwrite(str(made[name]), image[:, :, ::-1])
    strip, _ = shapes.make_image(rng, 200)
    for name, crop in {"1x700": strip[:1, :].repeat(4, axis=1)[:, :700], "700x1": strip[:, :1].repeat(4, axis=0)[:700],
                       "3x200": strip[:3]}.items():
        made[name] = folder / f"{name}.png"
        cv2.imwrite(str(made[name]), np.ascontiguousarray(crop[:, :, ::-1]))
    return made


def predict(tmp_path: Path, inputs: list[Path], *flags: str) -> dict:
    out = tmp_path / f"p{len(list(tmp_path.glob('p*.json')))}.json"
    result = CliRunner().invoke(app, ["predict", *map(str, inputs), "--weights", "shapes_demo", "--device", "cpu",
                                      "--workers", "0", "--out", str(out), "-q", *flags])
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    coco = json.loads(out.read_text())
    _check_valid(coco)
    return coco


def _check_valid(coco: dict) -> None:
    sizes = {image["id"]: (image["height"], image["width"]) for image in coco["images"]}
    seen = set()
    for annotation in coco["annotations"]:
        height, width = sizes[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= width + 0.01 and y + h <= height + 0.01, annotation["bbox"]
        assert annotation["segmentation"]["size"] == [height, width]
        assert mask_utils.area(annotation["segmentation"]) == annotation["area"] > 0
        key = (annotation["image_id"], annotation["category_id"], tuple(annotation["bbox"]))
        assert key not in seen, f"instance twice: {key}"
        seen.add(key)


def test_the_smallest_tile_with_the_largest_overlap(images, tmp_path):
    height, width = 100, 100
    windows = tile_windows(height, width, MIN_TILE, MAX_OVERLAP)
    assert len(windows) == 7 * 7  # steps of 6 px: the tile count grows as (side / (tile * (1 - overlap)))^2
    coco = predict(tmp_path, [images["small"]], "--slice", str(MIN_TILE), "--overlap", str(MAX_OVERLAP))
    assert coco["images"][0]["width"] == width


def test_no_overlap_and_a_tile_larger_than_the_image(images, tmp_path):
    predict(tmp_path, [images["shapes"]], "--slice", str(MIN_TILE), "--overlap", "0")
    # A tile larger than the image: it runs whole, the very bytes of an unsliced run.
    larger = predict(tmp_path, [images["shapes"]], "--slice", "100000")
    unsliced = predict(tmp_path, [images["shapes"]], "--slice", "off")
    assert larger == unsliced and larger["annotations"]


@pytest.mark.parametrize("name", ["1x700", "700x1", "3x200"])
def test_tiles_on_images_one_pixel_thin(images, tmp_path, name):
    height, width = cv2.imread(str(images[name])).shape[:2]
    windows = tile_windows(height, width, MIN_TILE, 0.5)
    assert all((x1 - x0, y1 - y0) == (min(MIN_TILE, width), min(MIN_TILE, height)) for x0, y0, x1, y1 in windows)
    coco = predict(tmp_path, [images[name]], "--slice", str(MIN_TILE), "--overlap", "0.5")
    assert (coco["images"][0]["height"], coco["images"][0]["width"]) == (height, width)


@pytest.mark.parametrize("match", ["iou", "ios"])
def test_the_strictest_match_threshold_and_nms(images, tmp_path, match):
    strict = predict(tmp_path, [images["small"]], "--slice", str(MIN_TILE), "--slice-match", match,
                     "--slice-match-thr", "1.0")
    loose = predict(tmp_path, [images["small"]], "--slice", str(MIN_TILE), "--slice-match", match,
                    "--slice-match-thr", "0.01", "--slice-merge", "nms")
    # A stricter match joins fewer pieces: at least as many instances (up to --max-det).
    assert strict["annotations"] and len(strict["annotations"]) >= min(len(loose["annotations"]), 100)
