"""RLE encoding of width-major mask stacks, and CocoWriter files checked with pycocotools itself."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segcli.ops.rle import encode_masks, rle_area
from segcli.writers.coco import CocoWriter

CATEGORIES = [{"id": 3, "name": "cat", "supercategory": "animal"}, {"id": 17, "name": "dog"}]


def _masks_hw(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """[N, H, W] bool masks: a filled rectangle (x1, y1, x2, y2) with one corner pixel cut."""
    masks = np.zeros((len(boxes), height, width), bool)
    for n, (x1, y1, x2, y2) in enumerate(boxes):
        masks[n, y1:y2, x1:x2] = True
        masks[n, y1, x1] = False  # asymmetric, so a transposed mask would not match
    return masks


def _width_major(masks_hw: np.ndarray) -> np.ndarray:
    """[N, H, W] -> C-contiguous [N, W, H], the layout encode_masks takes."""
    return np.ascontiguousarray(masks_hw.transpose(0, 2, 1))


# --- rle ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [bool, np.uint8])
def test_encode_masks_matches_pycocotools_and_round_trips(dtype):
    masks_hw = _masks_hw(30, 40, [(2, 3, 12, 20), (10, 0, 40, 30), (0, 0, 1, 2)]).astype(dtype)
    rles = encode_masks(_width_major(masks_hw))
    reference = mask_utils.encode(np.asfortranarray(masks_hw.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["size"] for r in rles] == [[30, 40]] * 3
    assert [r["counts"] for r in rles] == [r["counts"].decode("ascii") for r in reference]
    assert all(isinstance(r["counts"], str) for r in rles)
    decoded = mask_utils.decode(rles)  # [H, W, N]
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), masks_hw.astype(np.uint8))
    np.testing.assert_array_equal(rle_area(rles), masks_hw.reshape(3, -1).sum(axis=1))
    json.dumps(rles)  # JSON-ready as returned


def test_encode_masks_does_not_copy_c_contiguous_input(monkeypatch):
    masks = _width_major(_masks_hw(8, 6, [(1, 1, 5, 7)]))
    seen = []
    real_encode = mask_utils.encode
    monkeypatch.setattr(mask_utils, "encode", lambda stack: seen.append(stack) or real_encode(stack))
    encode_masks(masks)
    assert np.shares_memory(seen[0], masks) and seen[0].flags.f_contiguous


def test_encode_masks_non_binary_uint8_and_empty():
    masks_hw = _masks_hw(5, 7, [(1, 1, 6, 4)])
    as_255 = _width_major(masks_hw).astype(np.uint8) * 255
    assert encode_masks(as_255) == encode_masks(_width_major(masks_hw))
    assert encode_masks(np.zeros((0, 7, 5), np.uint8)) == []
    assert rle_area([]).shape == (0,)
    with pytest.raises(ValueError):
        encode_masks(np.zeros((7, 5), np.uint8))


# --- writer ------------------------------------------------------------------------------------

IMAGES = [  # file_name, height, width, boxes (x1, y1, x2, y2), category ids, scores
    ("a/one.jpg", 30, 40, [(2, 3, 12, 20), (15, 5, 39, 29)], [3, 17], [0.9, 0.61234567]),
    ("two.png", 25, 20, [(0, 0, 10, 10)], [17], [0.5]),
    ("empty.jpg", 10, 10, [], [], []),
]


def _add_all(writer: CocoWriter) -> list[int]:
    ids = []
    for file_name, height, width, boxes, category_ids, scores in IMAGES:
        masks = _masks_hw(height, width, boxes)
        ids.append(
            writer.add_image(
                file_name,
                np.int64(width),  # numpy scalars must end up as plain JSON numbers
                height,
                np.asarray(boxes, np.float32).reshape(-1, 4),
                np.asarray(scores, np.float32),
                np.asarray(category_ids, np.int64),
                encode_masks(_width_major(masks)),
            )
        )
    return ids


def _quiet(call):
    with contextlib.redirect_stdout(io.StringIO()):
        return call()


def test_dataset_file_loads_in_pycocotools(tmp_path):
    path = tmp_path / "out" / "pred.json"
    with CocoWriter(path, CATEGORIES, info={"description": "test", "year": np.int32(2024)}) as writer:
        assert _add_all(writer) == [1, 2, 3]
    raw = path.read_text()
    assert "\n" not in raw and " " not in raw.replace("segcli predictions", "")  # compact
    data = json.loads(raw)
    assert list(data) == ["info", "licenses", "images", "categories", "annotations"]
    assert data["info"] == {"description": "test", "year": 2024}
    assert data["licenses"] == []
    assert data["categories"] == CATEGORIES
    assert data["images"] == [
        {"id": 1, "file_name": "a/one.jpg", "width": 40, "height": 30},
        {"id": 2, "file_name": "two.png", "width": 20, "height": 25},
        {"id": 3, "file_name": "empty.jpg", "width": 10, "height": 10},
    ]
    first, second, third = data["annotations"]
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3]
    assert [a["image_id"] for a in data["annotations"]] == [1, 1, 2]
    assert [a["category_id"] for a in data["annotations"]] == [3, 17, 17]
    assert first["bbox"] == [2, 3, 10, 17] and second["bbox"] == [15, 5, 24, 24]
    assert first["area"] == 10 * 17 - 1 and isinstance(first["area"], float)
    assert second["score"] == 0.61235 and first["iscrowd"] == 0
    assert first["segmentation"]["size"] == [30, 40]

    coco = _quiet(lambda: COCO(str(path)))
    assert coco.getImgIds() == [1, 2, 3]
    assert coco.getAnnIds(imgIds=[3]) == []  # no detections, still listed
    assert sorted(coco.getCatIds()) == [3, 17]
    decoded = coco.annToMask(coco.anns[3])
    np.testing.assert_array_equal(decoded, _masks_hw(25, 20, [(0, 0, 10, 10)])[0])
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # spool files removed


def test_results_file_loads_and_evaluates_to_ap_one(tmp_path):
    dataset, results = tmp_path / "gt.json", tmp_path / "res.json"
    with CocoWriter(dataset, CATEGORIES) as writer:
        _add_all(writer)
    with CocoWriter(results, CATEGORIES, results_only=True) as writer:
        _add_all(writer)
    records = json.loads(results.read_text())
    assert [sorted(r) for r in records] == [["bbox", "category_id", "image_id", "score", "segmentation"]] * 3
    assert [r["image_id"] for r in records] == [1, 1, 2]

    gt = _quiet(lambda: COCO(str(dataset)))
    detections = _quiet(lambda: gt.loadRes(str(results)))
    for iou_type in ("segm", "bbox"):
        evaluator = COCOeval(gt, detections, iou_type)
        _quiet(lambda: (evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()))
        assert evaluator.stats[0] == pytest.approx(1.0)


def test_exception_in_with_block_writes_nothing(tmp_path):
    path = tmp_path / "pred.json"
    path.write_text("previous run")
    with pytest.raises(RuntimeError, match="boom"):
        with CocoWriter(path, CATEGORIES) as writer:
            _add_all(writer)
            raise RuntimeError("boom")
    assert path.read_text() == "previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["pred.json"]


def test_new_path_not_created_on_exception(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with CocoWriter(tmp_path / "new.json", CATEGORIES) as writer:
            _add_all(writer)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_caller_can_keep_partial_output(tmp_path):
    path = tmp_path / "pred.json"
    with pytest.raises(KeyboardInterrupt):
        with CocoWriter(path, CATEGORIES) as writer:
            try:
                writer.add_image("only.jpg", 10, 10, np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), [])
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                writer.close(partial_ok=True)
                raise
    coco = _quiet(lambda: COCO(str(path)))
    assert [img["file_name"] for img in coco.dataset["images"]] == ["only.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["pred.json"]


def test_bad_detections_are_rejected(tmp_path):
    with CocoWriter(tmp_path / "p.json", CATEGORIES) as writer:
        rles = encode_masks(np.ones((1, 4, 4), np.uint8))
        with pytest.raises(ValueError, match="unknown category ids \\[1\\]"):
            writer.add_image("x.jpg", 4, 4, np.zeros((1, 4)), np.ones(1), np.array([1]), rles)
        with pytest.raises(ValueError, match="disagree in length"):
            writer.add_image("x.jpg", 4, 4, np.zeros((2, 4)), np.ones(1), np.array([3]), rles)
    writer.close()  # closing twice is harmless
    with pytest.raises(RuntimeError):
        writer.add_image("y.jpg", 4, 4, np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), [])


def test_interrupt_in_the_middle_of_an_image_leaves_a_valid_partial_file(tmp_path):
    path = tmp_path / "pred.json"
    writer = CocoWriter(path, CATEGORIES)
    _add_all(writer)
    real_write = writer._images.write

    def interrupted(data: bytes) -> int:  # Ctrl-C after this image's annotations were spooled
        raise KeyboardInterrupt

    writer._images.write = interrupted
    rles = encode_masks(np.ones((1, 4, 4), np.uint8))
    with pytest.raises(KeyboardInterrupt):
        writer.add_image("lost.jpg", 4, 4, np.array([[0, 0, 4, 4]]), np.ones(1), np.array([3]), rles)
    writer._images.write = real_write
    assert writer.add_image("after.jpg", 4, 4, np.array([[0, 0, 4, 4]]), np.ones(1), np.array([3]), rles) == 4
    writer.close(partial_ok=True)
    coco = _quiet(lambda: COCO(str(path)))
    assert [img["file_name"] for img in coco.dataset["images"]][-1] == "after.jpg"
    assert [a["image_id"] for a in coco.dataset["annotations"]] == [1, 1, 2, 4]
    assert [a["id"] for a in coco.dataset["annotations"]] == [1, 2, 3, 4]


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Outputs are readable by whoever could read any new file (umask), not owner-only like mkstemp's."""
    import os

    from segcli.atomic import atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "out.json") as handle:
            handle.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o644
