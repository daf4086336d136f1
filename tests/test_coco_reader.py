"""Reading COCO files for training: real exports load, every kind of damage is reported with ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segcli.data.coco import decode_mask, load_coco
from segcli.errors import UsageError
from tests.conftest import SHARED_DATA, require

COCO_TINY = SHARED_DATA / "coco_tiny"


def test_fruits_nuts_loads_with_all_instances():
    dataset = load_coco(require(SHARED_DATA / "fruits_nuts" / "annotations.json"))
    assert len(dataset.images) == 18
    assert sum(len(r.instances) for r in dataset.images) == 165
    assert dataset.warnings == []
    assert dataset.label_to_category_id == [0, 1, 2, 3]


def test_coco_tiny_maps_noncontiguous_ids_and_ignores_crowds():
    annotations = require(COCO_TINY / "annotations" / "instances_train2017.json")
    raw = json.loads(annotations.read_text())
    dataset = load_coco(annotations, COCO_TINY / "images" / "train2017")
    ids = sorted(c["id"] for c in raw["categories"])
    assert dataset.label_to_category_id == [0] + ids  # label k <-> k-th smallest id
    assert [c["id"] for c in dataset.categories] == ids
    crowd = sum(bool(a.get("iscrowd")) for a in raw["annotations"])
    assert crowd > 0 and dataset.crowd_ignored == crowd
    targets = sum(len(r.instances) for r in dataset.images)
    assert targets == len(raw["annotations"]) - crowd
    # Images without annotations stay, as negatives.
    assert any(not r.instances for r in dataset.images)
    # Labels decode back to the annotation's category.
    by_id = {a["id"]: a for a in raw["annotations"]}
    for record in dataset.images[:5]:
        for instance in record.instances:
            assert dataset.label_to_category_id[instance.label] == by_id[instance.annotation_id]["category_id"]


def test_decoded_masks_equal_pycocotools():
    annotations = require(COCO_TINY / "annotations" / "instances_val2017.json")
    raw = json.loads(annotations.read_text())
    dataset = load_coco(annotations, COCO_TINY / "images" / "val2017")
    by_id = {a["id"]: a for a in raw["annotations"]}
    from pycocotools.coco import COCO
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotations))
    record = dataset.images[0]
    for instance in record.instances:
        expected = coco.annToMask(by_id[instance.annotation_id])
        np.testing.assert_array_equal(decode_mask(instance.segmentation, record.height, record.width), expected)


def _write_image(path: Path, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 100, np.uint8)).save(path)


def _messy(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "sub/c.png"):
        _write_image(tmp_path / "images" / name)
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((5, 5), np.uint8), ((2, 23), (3, 32)))))
    good_poly = [[5, 5, 20, 5, 20, 20, 5, 20]]
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 1, "file_name": "b.png", "width": 40, "height": 30},  # duplicate id
            {"id": 2, "file_name": "../outside.png", "width": 40, "height": 30},  # escapes the folder
            {"id": 3, "file_name": "/etc/passwd", "width": 40, "height": 30},  # absolute
            {"id": 4, "file_name": "missing.png", "width": 40, "height": 30},
            {"id": 5, "file_name": "sub/c.png", "width": 40, "height": 30},  # negative image
            {"id": 6, "file_name": "b.png", "width": 99, "height": 30},  # size disagrees with the file
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [5, 5, 15, 15], "segmentation": good_poly, "iscrowd": 0},
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [5, 5, 15, 15], "segmentation": good_poly},  # dup id
            {"id": 11, "image_id": 1, "category_id": 99, "bbox": [5, 5, 15, 15], "segmentation": good_poly},
            {"id": 12, "image_id": 42, "category_id": 7, "bbox": [5, 5, 15, 15], "segmentation": good_poly},
            {"id": 13, "image_id": 1, "category_id": 3, "bbox": [50, 50, 5, 5], "segmentation": good_poly},  # outside
            {"id": 14, "image_id": 1, "category_id": 3, "bbox": [30, 20, 20, 20], "segmentation": good_poly},  # clipped
            {"id": 15, "image_id": 1, "category_id": 3, "bbox": [5, 5, 5, 5], "segmentation": [[1, 1, 2, 2]]},
            {"id": 16, "image_id": 1, "category_id": 3, "bbox": [5, 5, 5, 5], "segmentation": [[1, 1, 5, 1, 9, 1]]},
            {"id": 17, "image_id": 1, "category_id": 3, "bbox": [3, 2, 5, 5],
             "segmentation": {"size": [30, 40], "counts": rle["counts"].decode()}},
            {"id": 18, "image_id": 1, "category_id": 3, "bbox": [3, 2, 5, 5],
             "segmentation": {"size": [31, 40], "counts": rle["counts"].decode()}},  # wrong size
            {"id": 19, "image_id": 1, "category_id": 3, "bbox": [3, 2, 5, 5], "segmentation": [], "iscrowd": 1},
            {"id": 20, "image_id": 1, "category_id": 3, "bbox": [3, 2, 5, 5]},  # no segmentation
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_messy_file_is_reported_with_ids_and_skipped(tmp_path):
    dataset = load_coco(_messy(tmp_path), tmp_path / "images")
    text = "\n".join(dataset.warnings)
    assert [r.image_id for r in dataset.images] == [1, 5]
    assert [i.annotation_id for i in dataset.images[0].instances] == [10, 14, 17]
    assert dataset.label_to_category_id == [0, 3, 7]
    expectations = [
        "image id 1: duplicate id", "image id 2: file_name '../outside.png'", "image id 3: file_name '/etc/passwd'",
        "image id 4: file not found", "image id 6:", "annotation id 10 (image id 1): duplicate id",
        "annotation id 11 (image id 1): unknown category id 99", "annotation id 12 (image id 42): unknown",
        "annotation id 13 (image id 1): box [50, 50, 5, 5] is empty or outside", "annotation id 14 (image id 1): box",
        "annotation id 15 (image id 1): degenerate polygon", "annotation id 16 (image id 1): degenerate polygon",
        "annotation id 18 (image id 1): RLE size [31, 40]", "annotation id 20 (image id 1): no segmentation",
    ]
    for expected in expectations:
        assert expected in text, expected
    assert "annotation id 19" not in text and dataset.crowd_ignored == 1
    clipped = dataset.images[0].instances[1]
    assert clipped.box == (30.0, 20.0, 40.0, 30.0)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[]", "not a COCO annotation file"),
    (json.dumps({"images": []}), "has no 'categories'"),
    (json.dumps({"images": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}), "category id 1 appears twice"),
    (json.dumps({"images": [{"id": 1, "file_name": "nope.png", "width": 2, "height": 2}],
                 "categories": [{"id": 1, "name": "a"}]}), "no usable images (1 image files not found"),
])
def test_unusable_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")) as error:
        load_coco(path, tmp_path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UsageError, match="COCO file not found"):
        load_coco(tmp_path / "nope.json")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(UsageError, match="images folder not found"):
        load_coco(path, tmp_path / "no_such_dir")
