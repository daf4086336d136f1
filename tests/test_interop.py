"""segcli's outputs read by readers segcli did not write: supervision (COCO and YOLO), LabelMe's own
LabelFile, shapely (GeoJSON), and CVAT's COCO 1.0 importer rules.

Two sources of masks: the shipped demo model's predictions on fresh synthetic shapes, written by
`segcli predict` itself (rings have holes, occluded shapes come in parts), and real COCO masks
(coco_tiny's train2017 annotations: polygons in several parts, crowd RLEs with holes) fed
through the writers. The reference for every comparison is segcli's own RLE of the same instance.

YOLO lines join an instance's parts and holes with zero-width links (as Ultralytics' COCO
converter joins parts), which readers fill as one-pixel lines: `assert_match` allows for them.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from segcli.cli import app
from segcli.ops.rle import encode_masks
from segcli.writers.coco import CocoWriter
from segcli.writers.geojson import GeoJsonWriter
from segcli.writers.per_image import LabelMeWriter, Target, YoloWriter
from segcli.writers.records import build_record
from tests.conftest import SHARED_DATA, require, synthetic_shapes

sv = pytest.importorskip("supervision")

COCO_TINY = SHARED_DATA / "coco_tiny"
COCO_IMAGES = COCO_TINY / "images" / "train2017"
FORMATS = {"rle.json": [], "polygons.json": ["--masks", "polygon"], "yolo/": ["--format", "yolo"],
           "labelme/": ["--format", "labelme"], "shapes.geojson": []}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def rings(mask: np.ndarray) -> int:
    """Outlines of a mask: its parts plus its holes."""
    import cv2

    return len(cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)[0])


def assert_match(pairs: list[tuple[np.ndarray, np.ndarray]], small: int = 0) -> None:
    """(mask read back, reference mask) pairs. A mask of one outline: IoU >= 0.95 (0.9 under
    `small` pixels, COCO's small objects for real masks; a mask of a few pixels, where one pixel
    is a tenth of the IoU, may differ in 5). A mask of several outlines (parts, holes), whose YOLO
    line adds the one-pixel links: 95% of its pixels come back, and beyond the mask there is
    nothing that a 3x3 opening (which erases one-pixel lines) leaves, holes staying empty."""
    import cv2

    assert len(pairs) >= 15
    for read, mask in pairs:
        area = int(mask.sum())
        if rings(mask) == 1:
            score = iou(read, mask)
            assert score >= (0.95 if area >= small else 0.9) or (area < 100 and (read ^ mask).sum() <= 5), (score, area)
            continue
        opened = cv2.morphologyEx(read.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
        assert (read & mask).sum() >= 0.95 * area and (opened & ~mask).sum() <= 0.05 * area, (rings(mask), area)


# -- the outputs under test ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """`segcli predict` with the demo model on 8 fresh shapes images, in every format read here."""
    root = tmp_path_factory.mktemp("demo")
    synthetic_shapes().generate(root, images=8, size=256, seed=4242)
    runner = CliRunner()
    for out, flags in FORMATS.items():
        result = runner.invoke(app, ["predict", str(root / "images"), "--weights", "shapes_demo", "--out",
                                     str(root / out), "-q", *flags])
        assert result.exit_code == 0, result.output
    return root


def demo_masks(demo: Path) -> dict[str, list[np.ndarray]]:
    """segcli's RLE masks per image file name, in output order (best score first)."""
    coco = json.loads((demo / "rle.json").read_text())
    masks = {image["file_name"]: [] for image in coco["images"]}
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    for annotation in coco["annotations"]:
        masks[names[annotation["image_id"]]].append(mask_utils.decode(annotation["segmentation"]).astype(bool))
    return masks


@pytest.fixture(scope="module")
def coco_records() -> tuple[list[dict], list[dict], dict]:
    """Real COCO masks as segcli records: (records with pixel-edge polygons, records with
    pixel-centre polygons, the COCO categories), for coco_tiny's train2017 images."""
    coco = COCO(str(require(COCO_TINY / "annotations" / "instances_train2017.json")))
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    edges, centres = [], []
    for image in coco.dataset["images"]:
        annotations = [a for a in coco.imgToAnns[image["id"]] if coco.annToMask(a).any()]
        masks = np.array([coco.annToMask(a).astype(bool) for a in annotations]).reshape(-1, image["height"], image["width"])
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)]).reshape(-1, 4)
        rles = encode_masks(np.ascontiguousarray(masks.transpose(0, 2, 1)))
        for target, centred in ((edges, False), (centres, True)):
            target.append(build_record(image["file_name"], None, None, image["width"], image["height"], boxes,
                                       np.linspace(1, 0.5, len(masks)), np.array([a["category_id"] for a in annotations]),
                                       rles, names, 1.0, pixel_centres=centred))
    return edges, centres, coco.dataset["categories"]


def record_masks(record: dict) -> list[np.ndarray]:
    return [mask_utils.decode(instance["segmentation"]).astype(bool) for instance in record["instances"]]


def test_the_masks_under_test_have_parts_and_holes(demo, coco_records):
    """Otherwise the tests below would not show that parts and holes survive."""
    coco_polygons = [i["polygons"] for r in coco_records[0] for i in r["instances"]]
    assert sum(len(p) > 1 for p in coco_polygons) >= 10 and sum(len(part) > 1 for p in coco_polygons for part in p) >= 3
    demo_shapes = json.loads((demo / "shapes.geojson").read_text())["features"]
    coordinates = [f["geometry"]["coordinates"] for f in demo_shapes]
    assert sum(len(c) > 1 for c in coordinates) >= 1  # an instance in several parts
    assert sum(len(part) > 1 for c in coordinates for part in c) >= 1  # a ring's hole


# -- supervision -----------------------------------------------------------------------------------

def test_supervision_reads_the_coco_file_with_segcli_masks(demo):
    expected = demo_masks(demo)
    dataset = sv.DetectionDataset.from_coco(str(demo / "images"), str(demo / "rle.json"), force_masks=True)
    assert len(dataset) == len(expected) == 8
    for path, _, detections in dataset:
        masks = expected[Path(path).name]
        assert len(detections) == len(masks)
        for read, mask in zip(detections.mask, masks):
            assert iou(read, mask) >= 0.95
    assert sum(len(m) for m in expected.values()) >= 15
    # The polygon file carries the same instances (supervision fills COCO polygons with cv2.fillPoly,
    # half a pixel wider all round than pycocotools, COCO's own rasterizer: only counts are compared).
    polygons = sv.DetectionDataset.from_coco(str(demo / "images"), str(demo / "polygons.json"), force_masks=True)
    assert {Path(p).name: len(d) for p, _, d in polygons} == {name: len(m) for name, m in expected.items()}


def test_supervision_reads_yolo_labels_one_object_per_instance(demo):
    expected = demo_masks(demo)
    dataset = sv.DetectionDataset.from_yolo(str(demo / "images"), str(demo / "yolo"), str(demo / "yolo" / "data.yaml"),
                                            force_masks=True)
    assert dataset.classes == list(synthetic_shapes().CLASSES)
    categories = json.loads((demo / "rle.json").read_text())["annotations"]
    assert len(dataset) == len(expected)
    pairs = []
    for path, _, detections in dataset:
        masks = expected[Path(path).name]
        assert len(detections) == len(masks)  # one line per instance
        pairs += zip(detections.mask, masks)
    assert_match(pairs)
    assert any(rings(mask) > 1 for _, mask in pairs)
    class_ids = [int(c) for _, _, d in dataset for c in d.class_id]
    assert sorted(class_ids) == sorted(synthetic_shapes().CATEGORY_IDS.index(a["category_id"]) for a in categories)


def test_supervision_reads_yolo_labels_of_real_coco_masks(tmp_path, coco_records):
    _, centres, categories = coco_records
    assert YoloWriter.pixel_centres  # what predict builds its records with for this writer
    writer = YoloWriter(tmp_path, categories)
    for record in centres:
        writer.write(Target(record, Path(record["file"]).stem, Path(record["file"])))
    dataset = sv.DetectionDataset.from_yolo(str(require(COCO_IMAGES)), str(tmp_path),
                                            str(tmp_path / "data.yaml"), force_masks=True)
    expected = {Path(r["file"]).name: record_masks(r) for r in centres}
    pairs = []
    for path, _, detections in dataset:
        masks = expected[Path(path).name]
        assert len(detections) == len(masks)  # one line per instance: parts joined, none lost
        if masks:
            pairs += zip(detections.mask, masks)
    assert len(pairs) > 250
    assert_match(pairs, small=32 * 32)


# -- LabelMe ---------------------------------------------------------------------------------------

def labelme_instances(path: Path, shape: tuple[int, int]) -> list[np.ndarray]:
    """A LabelMe file read by labelme's own LabelFile, its shapes filled by labelme's shape_to_mask,
    the shapes of one group_id united: one mask per instance, in group order."""
    from labelme import LabelFile
    from labelme.utils import shape_to_mask

    label_file = LabelFile(str(path))  # also reads the image imagePath names, and checks its size
    groups: dict[int, np.ndarray] = {}
    for item in label_file.shapes:
        mask = shape_to_mask(shape, item["points"], item["shape_type"])
        groups[item["group_id"]] = groups.get(item["group_id"], np.zeros(shape, bool)) | mask
    return [groups[k] for k in sorted(groups)]


def filled(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled: what LabelMe polygons can hold."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
    return out.astype(bool)


def test_labelme_label_file_reads_the_labelme_output(demo):
    pytest.importorskip("labelme")
    expected = demo_masks(demo)
    files = sorted((demo / "labelme").glob("*.json"))
    assert len(files) == len(expected)
    for path in files:
        masks = expected[path.stem + ".png"]
        read = labelme_instances(path, (256, 256))
        assert len(read) == len(masks)
        for got, mask in zip(read, masks):
            assert iou(got, filled(mask)) >= (0.95 if rings(filled(mask)) == 1 else 0.9)


def test_labelme_label_file_reads_real_coco_masks(tmp_path, coco_records):
    pytest.importorskip("labelme")
    _, centres, _ = coco_records
    assert LabelMeWriter.pixel_centres
    image_dir = require(COCO_IMAGES)
    writer = LabelMeWriter(tmp_path)
    pairs = []
    for record in centres:
        stem = Path(record["file"]).stem
        writer.write(Target(record, stem, image_dir / record["file"]))
        masks = record_masks(record)
        read = labelme_instances(tmp_path / f"{stem}.json", (record["height"], record["width"]))
        assert len(read) == len(masks)
        pairs += [(got, filled(mask)) for got, mask in zip(read, masks)]
    assert_match(pairs, small=32 * 32)


# -- GeoJSON ---------------------------------------------------------------------------------------

def assert_valid_right_handed(collection: dict) -> None:
    for feature in collection["features"]:
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.geom_type == "MultiPolygon" and geometry.is_valid, shapely.is_valid_reason(geometry)
        for part in geometry.geoms:  # RFC 7946: exteriors counter-clockwise, holes clockwise
            assert part.exterior.is_ccw and not any(hole.is_ccw for hole in part.interiors)
        assert abs(geometry.area - feature["properties"]["area"]) <= 0.1 * feature["properties"]["area"] + 2


def test_every_geojson_geometry_is_valid(demo, coco_records):
    collection = json.loads((demo / "shapes.geojson").read_text())
    assert len(collection["features"]) == sum(len(m) for m in demo_masks(demo).values())
    assert_valid_right_handed(collection)
    edges, _, _ = coco_records
    buffer = io.BytesIO()
    writer = GeoJsonWriter(buffer)
    for record in edges:
        writer.add_record(record)
    writer.finish()
    collection = json.loads(buffer.getvalue())
    assert len(collection["features"]) == sum(len(r["instances"]) for r in edges)
    assert_valid_right_handed(collection)


# -- CVAT's COCO 1.0 importer ------------------------------------------------------------------------

class CvatImportError(Exception):
    pass


def cvat_coco_objects(dataset: dict) -> dict[str, list[list[str]]]:
    """What CVAT's "COCO 1.0" import makes of a COCO file: per image file name, its objects, each
    the list of its shapes' types.

    The rules are CVAT's (cvat/apps/dataset_manager/formats/coco.py imports with Datumaro's
    `coco_instances` extractor, then bindings.import_dm_annotations): ids, image_id, category_id
    and iscrowd must be ints (iscrowd is required); category_id must be declared; `score` must be a
    number. A list segmentation is one polygon per entry, each an even count of at least 6 values,
    all in the annotation's group; a dict is an RLE mask (uncompressed `counts` must match the
    image size); an empty one falls back to the 4-value bbox. Shapes of one group become one
    object (CVAT groups a group of more than one shape; a group of one is the shape alone).
    """
    def field(obj: dict, key: str, kind):
        if key not in obj:
            raise CvatImportError(f"missing field {key!r} in {obj}")
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool) and kind is not bool:
            raise CvatImportError(f"field {key!r} is {type(obj[key]).__name__}, expected {kind}")
        return obj[key]

    categories = {field(c, "id", int) for c in field(dataset, "categories", list)}
    for category in dataset["categories"]:
        field(category, "name", str)
    images = {}
    for image in field(dataset, "images", list):
        images[field(image, "id", int)] = image
        field(image, "file_name", str)
    objects: dict[str, dict[int, list[str]]] = {image["file_name"]: {} for image in images.values()}
    for annotation in field(dataset, "annotations", list):
        group = field(annotation, "id", int)
        image = images.get(field(annotation, "image_id", int))
        if image is None:
            raise CvatImportError(f"unknown image id {annotation['image_id']}")
        if field(annotation, "category_id", int) not in categories:
            raise CvatImportError(f"undeclared category {annotation['category_id']}")
        field(annotation, "iscrowd", int)
        if "score" in annotation:
            field(annotation, "score", (int, float))
        if not isinstance(annotation.get("attributes", {}), dict):
            raise CvatImportError("attributes must be a dict")
        segmentation = field(annotation, "segmentation", (list, dict))
        shapes = []
        if isinstance(segmentation, list) and segmentation and segmentation != [[]]:
            for polygon in segmentation:
                if len(polygon) % 2 or len(polygon) < 6:
                    raise CvatImportError(f"polygon of {len(polygon)} values")
                shapes.append("polygon")
        elif isinstance(segmentation, dict):
            if isinstance(field(segmentation, "counts", (list, str)), list):
                if list(field(segmentation, "size", list)) != [image["height"], image["width"]]:
                    raise CvatImportError("mask size differs from the image's")
            mask = mask_utils.decode(segmentation)  # what Datumaro's RleMask does with it
            if mask.shape != (image["height"], image["width"]) or not mask.any():
                raise CvatImportError("RLE of the wrong size, or empty (CVAT cannot place an empty mask)")
            shapes.append("mask")
        else:
            if len(field(annotation, "bbox", list)) != 4:
                raise CvatImportError("bbox of the wrong length")
            shapes.append("rectangle")
        objects[image["file_name"]].setdefault(group, []).extend(shapes)
    return {name: list(groups.values()) for name, groups in objects.items()}


@pytest.mark.parametrize("name", ["rle.json", "polygons.json"])
def test_cvat_imports_every_instance_as_one_object(demo, name):
    dataset = json.loads((demo / name).read_text())
    objects = cvat_coco_objects(dataset)
    assert {file: len(o) for file, o in objects.items()} == {file: len(m) for file, m in demo_masks(demo).items()}
    assert all(a["iscrowd"] == 0 for a in dataset["annotations"])  # predictions, not crowd regions
    kinds = {kind for o in objects.values() for shapes in o for kind in shapes}
    assert kinds == ({"mask"} if name == "rle.json" else {"polygon"})


def test_cvat_imports_a_mask_in_two_parts_as_one_object(tmp_path, coco_records):
    edges, _, categories = coco_records
    for polygons in (False, True):
        out = tmp_path / f"coco_{polygons}.json"
        with CocoWriter(out, categories) as writer:
            for record in edges:
                writer.add_record(record, polygons=polygons)
        objects = cvat_coco_objects(json.loads(out.read_text()))
        for record in edges:
            shapes = objects[record["file"]]
            assert len(shapes) == len(record["instances"])
            parts = [len(instance["polygons"]) for instance in record["instances"]]
            assert [len(s) for s in shapes] == (parts if polygons else [1] * len(parts))
        assert max(len(s) for o in objects.values() for s in o) >= (2 if polygons else 1)


def test_the_cvat_rules_refuse_what_cvat_refuses():
    """The checker above is not a pass-through: CVAT's rejections are rejected."""
    good = {"categories": [{"id": 1, "name": "a"}], "images": [{"id": 1, "file_name": "x.jpg", "width": 4, "height": 4}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2]]}]}
    assert cvat_coco_objects(good) == {"x.jpg": [["polygon"]]}
    for broken in ({"iscrowd": None}, {"segmentation": [[0, 0, 2, 0]]}, {"category_id": 2}, {"score": "high"}):
        annotation = {k: v for k, v in {**good["annotations"][0], **broken}.items() if v is not None}
        with pytest.raises(CvatImportError):
            cvat_coco_objects({**good, "annotations": [annotation]})


# -- the install ---------------------------------------------------------------------------------

def test_the_readers_did_not_bring_a_second_opencv():
    """supervision and labelme must not pull opencv-python (GUI, Qt) beside opencv-python-headless:
    both install a `cv2`, and whichever lands last breaks the other."""
    import cv2

    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert sorted(n for n in installed if n.startswith("opencv")) == ["opencv-python-headless"]
    assert cv2.imdecode(cv2.imencode(".png", np.zeros((2, 2), np.uint8))[1], cv2.IMREAD_UNCHANGED).shape == (2, 2)
