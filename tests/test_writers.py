"""Output formats: polygons against the masks they come from (pycocotools rasterization), and every
per-image / one-file writer against the records it was given."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segcli.data.sources import InputItem
from segcli.ops.rle import encode_masks
from segcli.writers.coco import CocoWriter
from segcli.writers.geojson import GeoJsonWriter
from segcli.writers.paths import frame_stem, output_stems
from segcli.writers.per_image import LabelMeWriter, PngWriter, Target, YoloWriter
from segcli.writers.polygons import mask_polygons
from segcli.writers.records import build_record
from tests.conftest import SHARED_DATA, require

CATEGORIES = [{"id": 1, "name": "date"}, {"id": 3, "name": "fig"}, {"id": 7, "name": "hazel nut"}]
NAMES = {c["id"]: c["name"] for c in CATEGORIES}


def rasterize(polygons, height: int, width: int) -> np.ndarray:
    """pycocotools' polygon rasterizer (the one COCO tools use), holes cut out."""
    out = np.zeros((height, width), bool)
    for part in polygons:
        def fill(ring):
            return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[v for p in ring for v in p]], height, width))).astype(bool)
        region = fill(part.exterior)
        for hole in part.holes:
            region &= ~fill(hole)
        out |= region
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def real_masks() -> list[np.ndarray]:
    """Real instance masks: COCO polygons and crowd RLEs (coco_tiny) and fruits_nuts annotations."""
    files = [SHARED_DATA / "coco_tiny/annotations/instances_val2017.json", SHARED_DATA / "fruits_nuts/annotations.json"]
    masks = []
    for file in files:
        coco = COCO(str(require(file)))
        masks += [coco.annToMask(a).astype(bool) for a in coco.dataset["annotations"]]
    return [m for m in masks if m.any()]


def test_polygons_of_real_masks_rasterize_back_with_iou_at_least_095(real_masks):
    assert len(real_masks) > 200
    for tolerance in (0.0, 1.0, 2.0):
        worst = 1.0
        for mask in real_masks:
            parts = mask_polygons(mask, tolerance)
            for part in parts:
                assert shapely.Polygon(part.exterior, part.holes).is_valid
            worst = min(worst, iou(rasterize(parts, *mask.shape), mask))
        assert worst >= (0.99 if tolerance == 0 else 0.95), (tolerance, worst)


def test_every_part_and_hole_is_kept():
    mask = np.zeros((80, 100), bool)
    mask[10:40, 10:50] = True
    mask[20:28, 20:30] = False  # a hole
    mask[50:70, 60:90] = True  # a second blob
    mask[75, 5:30] = True  # a one-pixel-wide line
    mask[5, 95] = True  # a single pixel
    mask[25, 25] = True  # an island inside the hole
    parts = mask_polygons(mask, 1.0)
    assert len(parts) == 5
    assert sorted(len(p.holes) for p in parts) == [0, 0, 0, 0, 1]
    assert iou(rasterize(parts, 80, 100), mask) >= 0.95
    geometry = shapely.MultiPolygon([shapely.Polygon(p.exterior, p.holes) for p in parts])
    assert geometry.is_valid
    # Exact outline: the areas are the pixel counts (OpenCV traces hole corners diagonally, which
    # chamfers each of the hole's 4 corners by a quarter pixel).
    exact = mask_polygons(mask, 0.0)
    assert abs(sum(shapely.Polygon(p.exterior, p.holes).area for p in exact) - mask.sum()) <= 1.0 + 1e-9
    assert mask_polygons(np.zeros((5, 5), bool)) == []


def test_tolerance_simplifies_big_shapes():
    mask = np.zeros((300, 300), np.uint8)
    cv2.circle(mask, (150, 150), 120, 1, -1)
    exact, simple = mask_polygons(mask, 0.0), mask_polygons(mask, 2.0)
    assert len(simple[0].exterior) < len(exact[0].exterior) / 3
    assert iou(rasterize(simple, 300, 300), mask.astype(bool)) >= 0.98


def _record(masks: np.ndarray, scores, categories, tolerance=1.0, file="sub/img.jpg", frame=None,
            pixel_centres=False) -> dict:
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    rles = encode_masks(np.ascontiguousarray(masks.transpose(0, 2, 1)))
    return build_record(file, frame, None if frame is None else frame / 10, masks.shape[2], masks.shape[1],
                        np.array(boxes, float), np.array(scores), np.array(categories), rles, NAMES, tolerance,
                        pixel_centres=pixel_centres)


@pytest.fixture()
def two_instances() -> np.ndarray:
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 10:30, 10:30] = True
    masks[0, 40:50, 60:75] = True  # instance 0 has two parts
    masks[1, 20:40, 20:50] = True  # overlaps instance 0
    masks[1, 25:30, 30:35] = False  # with a hole
    return masks


def test_record_matches_masks(two_instances):
    record = _record(two_instances, [0.9, 0.6], [3, 7])
    assert [i["category_name"] for i in record["instances"]] == ["fig", "hazel nut"]
    assert record["instances"][0]["bbox"] == [10.0, 10.0, 65.0, 40.0]
    for instance, mask in zip(record["instances"], two_instances):
        assert np.array_equal(mask_utils.decode(instance["segmentation"]).astype(bool), mask)
        assert instance["area"] == mask.sum()
    assert len(record["instances"][0]["polygons"]) == 2 and len(record["instances"][1]["polygons"][0]) == 2


def test_png_writer_instance_and_class_images(tmp_path, two_instances):
    record = _record(two_instances, [0.9, 0.6], [3, 7], None)
    files = PngWriter(tmp_path, CATEGORIES).write(Target(record, "sub/img", Path("sub/img.jpg")))
    assert files == ["sub/img.instances.png", "sub/img.classes.png"]
    instances = cv2.imread(str(tmp_path / files[0]), cv2.IMREAD_UNCHANGED)
    classes = cv2.imread(str(tmp_path / files[1]), cv2.IMREAD_UNCHANGED)
    assert instances.dtype == np.uint16 and classes.dtype == np.uint8 and instances.shape == (60, 80)
    expected = np.zeros((60, 80), np.uint16)
    expected[two_instances[1]] = 2
    expected[two_instances[0]] = 1  # the higher score wins the overlap
    assert np.array_equal(instances, expected)
    assert np.array_equal(classes, np.choose(expected, [0, 3, 7]).astype(np.uint8))


def test_png_writer_refuses_ids_over_255(tmp_path):
    from segcli.errors import UsageError

    with pytest.raises(UsageError, match="8 bits"):
        PngWriter(tmp_path, [{"id": 300, "name": "x"}])


def fill_poly(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """How YOLO and LabelMe readers rasterize (Ultralytics, supervision: cv2.fillPoly on pixel indices)."""
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(xy).astype(np.int32)], 1)
    return mask.astype(bool)


def test_yolo_writer_one_line_per_instance_normalized_with_names(tmp_path, two_instances):
    assert YoloWriter.pixel_centres
    record = _record(two_instances, [0.9, 0.6], [3, 7], pixel_centres=True)
    writer = YoloWriter(tmp_path, CATEGORIES)
    writer.write(Target(record, "sub/img", Path("x")))
    lines = (tmp_path / "sub/img.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2"]  # fig (index 1): its two parts in one line
    filled = []
    for line in lines:
        xy = np.array(line.split()[1:], float).reshape(-1, 2) * [80, 60]
        assert xy.min() >= 0 and (xy <= [80, 60]).all()
        filled.append(fill_poly(xy, 60, 80))
    assert (filled[0] >= two_instances[0]).all()  # both parts, whole
    # and the one-pixel link between their nearest corners, pixels (29, 29) and (60, 40)
    assert (filled[0] & ~two_instances[0]).sum() <= 60 - 29 + 1
    assert iou(filled[1], two_instances[1]) >= 0.95
    assert not filled[1][25:30, 30:35].any()  # the hole, joined like a part: even-odd filling keeps it empty
    data = (tmp_path / "data.yaml").read_text()
    assert 'nc: 3' in data and '0: "date"' in data and '2: "hazel nut"' in data
    writer.write(Target(_record(np.zeros((0, 60, 80), bool), [], []), "empty", Path("x")))
    assert (tmp_path / "empty.txt").read_text() == ""


def test_labelme_writer(tmp_path, two_instances):
    source = tmp_path / "photos" / "sub" / "img.jpg"
    record = _record(two_instances, [0.9, 0.6], [3, 7], pixel_centres=LabelMeWriter.pixel_centres)
    LabelMeWriter(tmp_path / "out").write(Target(record, "sub/img", source))
    document = json.loads((tmp_path / "out/sub/img.json").read_text())
    assert document["imageWidth"] == 80 and document["imageHeight"] == 60 and document["imageData"] is None
    assert (tmp_path / "out/sub" / document["imagePath"]).resolve() == source.resolve()
    shapes = document["shapes"]
    assert [(s["label"], s["group_id"]) for s in shapes] == [("fig", 0), ("fig", 0), ("hazel nut", 1)]
    assert all(s["shape_type"] == "polygon" and len(s["points"]) >= 3 for s in shapes)


def test_geojson_keeps_holes_and_parts(two_instances):
    buffer = io.BytesIO()
    writer = GeoJsonWriter(buffer)
    writer.add_record(_record(two_instances, [0.9, 0.6], [3, 7]))
    writer.add_record(_record(two_instances[:1], [0.5], [1], frame=12, file="clip.mp4"))
    writer.finish()
    collection = json.loads(buffer.getvalue())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 3
    for feature, mask in zip(collection["features"], [two_instances[0], two_instances[1], two_instances[0]]):
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.is_valid and geometry.geom_type == "MultiPolygon"
        assert abs(geometry.area - mask.sum()) / mask.sum() < 0.05
    assert len(collection["features"][0]["geometry"]["coordinates"]) == 2  # two parts
    assert len(collection["features"][1]["geometry"]["coordinates"][0]) == 2  # exterior + hole
    assert collection["features"][2]["properties"]["frame"] == 12


def test_coco_polygons_and_frames_load_in_pycocotools(tmp_path, two_instances):
    out = tmp_path / "p.json"
    with CocoWriter(out, CATEGORIES) as writer:
        writer.add_record(_record(two_instances, [0.9, 0.6], [3, 7]), polygons=True)
        writer.add_record(_record(two_instances, [0.9, 0.6], [3, 7], frame=3, file="v.mp4"), polygons=True)
    coco = COCO(str(out))
    assert [i["file_name"] for i in coco.dataset["images"]] == ["sub/img.jpg", "v.mp4#3"]
    assert coco.imgs[2]["frame"] == 3 and coco.imgs[2]["video"] == "v.mp4"
    first = coco.anns[1]
    assert isinstance(first["segmentation"], list) and len(first["segmentation"]) == 2
    assert iou(coco.annToMask(first).astype(bool), two_instances[0]) >= 0.95


def test_output_stems_mirror_folders_and_never_clash():
    items = [InputItem(Path(n), n) for n in ["a/img.jpg", "b/img.jpg", "a/img.png", "a/IMG.jpg", "/abs/x.jpg",
                                              "../up/y.jpg", "clip.mp4"]]
    stems = output_stems(items)
    assert stems == ["a/img", "b/img", "a/img.png", "a/IMG.jpg", "abs/x", "up/y", "clip"]
    assert frame_stem("clip", 42) == "clip/000042" and frame_stem("a/img", None) == "a/img"


def test_join_parts_walks_every_ring_once_through_middle_parts():
    """Three squares in a row (the middle one is entered and left at different corners) and a
    square with a hole: filled by the even-odd rule, the joined path gives every part back, the
    hole empty, and beyond them only the one-pixel links."""
    from segcli.writers.join_parts import join_parts

    mask = np.zeros((40, 120), bool)
    for left in (5, 45, 85):
        mask[5:20, left:left + 15] = True
    mask[25:38, 50:70] = True
    mask[29:34, 55:65] = False
    parts = mask_polygons(mask, 0.0, pixel_centres=True)
    rings = [np.asarray(ring[:-1]) for part in parts for ring in [part.exterior, *part.holes]]
    assert len(rings) == 5
    path = join_parts(rings)
    assert {tuple(p) for r in rings for p in r} <= {tuple(p) for p in path}
    read = fill_poly(path, 40, 120)
    assert (read >= mask).all() and not read[30:33, 56:64].any()
    assert (read & ~mask).sum() <= 4 * 40  # four links, none longer than 40 pixels
    assert join_parts(rings[:1]) is not None and np.array_equal(join_parts(rings[:1]), rings[0])


def test_instances_without_a_polygon_keep_their_box(tmp_path):
    """A one-pixel-wide mask has no area on the pixel-centre line: too small to be a polygon, but
    the instance is not lost (one YOLO line, one LabelMe shape per instance)."""
    masks = np.zeros((1, 30, 40), bool)
    masks[0, 10, 5:25] = True
    record = _record(masks, [0.9], [1], pixel_centres=True)
    assert record["instances"][0]["polygons"] == []
    YoloWriter(tmp_path, CATEGORIES).write(Target(record, "line", Path("x")))
    (line,) = (tmp_path / "line.txt").read_text().splitlines()
    xy = np.array(line.split()[1:], float).reshape(-1, 2) * [40, 30]
    assert line.split()[0] == "0" and np.array_equal(fill_poly(xy, 30, 40), masks[0])
    LabelMeWriter(tmp_path).write(Target(record, "line", tmp_path / "x.jpg"))
    (shape,) = json.loads((tmp_path / "line.json").read_text())["shapes"]
    assert shape["shape_type"] == "rectangle" and shape["points"] == [[5.0, 10.0], [24.0, 10.0]]
