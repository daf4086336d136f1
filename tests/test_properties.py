"""Property tests (hypothesis, derandomized and bounded): the RLE encoders and decoders against
pycocotools, the polygons traced from masks (valid, and back on the mask within the tolerance's
reach), the merge of tiles' detections (an object cut by seams is one instance, its own mask),
and the two COCO readers (`segcli train`'s and `segcli eval`'s): any messy file loads or is one
SegcliError, never another exception."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils
from shapely.geometry import box as shapely_box

from segcli.data.coco import decode_mask, load_coco
from segcli.errors import SegcliError
from segcli.evaluate.ground_truth import ground_truth_from_dataset
from segcli.evaluate.results import normalize_results
from segcli.ops.rle import encode_masks, rle_area
from segcli.ops.rle_crops import MaskCrop, crop_to_rle, rle_counts, rle_to_crop
from segcli.predict.slice_merge import Piece, merge_pieces
from segcli.predict.slicing import tile_windows
from segcli.writers.polygons import mask_geometry, mask_polygons

# Seeded (derandomize) and bounded: the same examples on every run, no database, no deadline
# (CI machines are slow and shared; time is bounded by max_examples).
BOUNDED = dict(derandomize=True, database=None, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- masks ----------------------------------------------------------------------------------------

@st.composite
def masks(draw, max_side: int = 40) -> np.ndarray:
    """[H, W] bool masks of every kind: noise of any density, filled rectangles, empty and full,
    one-pixel-wide rows and columns, and shapes touching every border."""
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    kind = draw(st.sampled_from(["noise", "blocks", "empty", "full", "line"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.uniform(size=(height, width)) < draw(st.floats(0.0, 1.0))
    mask = np.zeros((height, width), bool)
    if kind == "full":
        mask[:] = True
    elif kind == "blocks":
        for _ in range(draw(st.integers(1, 5))):
            y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
            mask[y0:y0 + int(rng.integers(1, height + 1)), x0:x0 + int(rng.integers(1, width + 1))] ^= True
    elif kind == "line":
        if rng.uniform() < 0.5:
            mask[int(rng.integers(0, height)), :] = True
        else:
            mask[:, int(rng.integers(0, width))] = True
    return mask


@settings(max_examples=300, **BOUNDED)
@given(masks())
def test_encode_masks_is_pycocotools_and_decodes_back(mask):
    expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    # encode_masks takes masks width-major ([N, W, H]); bool and 0/255 uint8 alike.
    for given_as in (mask.T[None], (mask.T[None] * np.uint8(255))):
        (rle,) = encode_masks(np.ascontiguousarray(given_as))
        assert rle == {"size": list(mask.shape), "counts": expected["counts"].decode("ascii")}
        assert np.array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    assert rle_area([rle]).tolist() == [int(mask.sum())]
    assert rle_counts(rle).sum() == mask.size


@settings(max_examples=300, **BOUNDED)
@given(masks(max_side=24), st.integers(0, 30), st.integers(0, 30), st.integers(0, 30), st.integers(0, 30))
def test_crop_to_rle_and_back_equals_the_placed_mask(crop, left, top, right, bottom):
    height, width = crop.shape[0] + top + bottom, crop.shape[1] + left + right
    full = np.zeros((height, width), np.uint8)
    full[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    rle = crop_to_rle(crop, left, top, height, width)
    assert rle["counts"] == mask_utils.encode(np.asfortranarray(full))["counts"].decode("ascii")
    back = rle_to_crop(rle)
    placed = np.zeros_like(full)
    placed[back.y0:back.y1, back.x0:back.x1] = back.mask
    assert np.array_equal(placed, full)
    if full.any():  # the tight rectangle
        assert back.mask.any(axis=0)[[0, -1]].all() and back.mask.any(axis=1)[[0, -1]].all()
    # The uncompressed form of the same mask reads back the same runs.
    runs = rle_counts(rle)
    assert rle_counts({"size": [height, width], "counts": runs.tolist()}).tolist() == runs.tolist()


# -- polygons -------------------------------------------------------------------------------------

def _pixels(mask: np.ndarray):
    """The mask as the union of its pixel squares (pixel (col, row) is [col, col+1] x [row, row+1])."""
    rows, cols = np.nonzero(mask)
    return shapely.union_all([shapely_box(c, r, c + 1, r + 1) for r, c in zip(rows.tolist(), cols.tolist())])


def _holes_filled(mask: np.ndarray) -> np.ndarray:
    """The mask with every background pixel that the outside cannot reach 4-connected filled in
    (OpenCV's rule: foreground 8-connected, background 4-connected)."""
    import cv2

    outside = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    flood = np.zeros((outside.shape[0] + 2, outside.shape[1] + 2), np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 2, flags=4)
    return (outside != 2)[1:-1, 1:-1]


# Rings one pixel wide around a hole (found by this test: their holes came out filled).
THIN_RING = np.array([[0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 1, 0], [0, 1, 1, 1, 1, 0, 0]], bool)
DIAGONAL_RING = np.array([[0, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0]], bool)


@settings(max_examples=150, **BOUNDED)
@given(masks(max_side=24), st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.integers(0, 50), st.integers(0, 50))
@example(THIN_RING, 0.0, 0, 0)
@example(DIAGONAL_RING, 0.0, 0, 0)
@example(np.pad(THIN_RING, 3), 1.0, 7, 2)
def test_polygons_are_valid_and_lie_on_the_mask_within_the_tolerance(mask, tolerance, ox, oy):
    polygons = mask_polygons(mask, tolerance, origin=(ox, oy))
    if not mask.any():
        assert polygons == []
        return
    geometry = mask_geometry(mask, tolerance, origin=(ox, oy))
    assert geometry.is_valid and not geometry.is_empty
    areas = [shapely.Polygon(p.exterior, p.holes).area for p in polygons]
    assert areas == sorted(areas, reverse=True)
    for polygon in polygons:
        shape = shapely.Polygon(polygon.exterior, polygon.holes)
        assert shape.is_valid and shape.area > 0
        assert shapely.Polygon(polygon.exterior).exterior.is_ccw  # counter-clockwise outer ring
    pixels = shapely.affinity.translate(_pixels(mask), ox, oy)
    # Growing a pixel-centre line by half a pixel misses a staircase's corners by up to ~0.21 px
    # and mitres reach ~0.3 px past them; simplification moves the centre line by the tolerance.
    reach = tolerance + 0.75
    band = pixels.boundary.buffer(reach)
    assert geometry.symmetric_difference(pixels).difference(band).area < 1e-6
    # Every pixel deeper inside the mask than that reach is covered, and nothing lies farther out.
    assert pixels.buffer(-reach).difference(geometry).area < 1e-6
    assert geometry.difference(pixels.buffer(reach)).area < 1e-6
    if tolerance == 0.0:
        # The exact outline: it differs from the pixel squares only at diagonal steps.
        assert geometry.symmetric_difference(pixels).area <= 0.5 * len(shapely.get_coordinates(geometry)) + 1e-6
    # Centre-line polygons (for fillPoly readers): valid, and inside the mask's parts (holes of a
    # pixel or two have no centre-line ring of their own: fillPoly fills them either way).
    filled = shapely.affinity.translate(_pixels(_holes_filled(mask)), ox, oy)
    for polygon in mask_polygons(mask, tolerance, pixel_centres=True, origin=(ox, oy)):
        shape = shapely.Polygon(polygon.exterior, polygon.holes)
        assert shape.is_valid and shape.area > 0
        assert shapely.affinity.translate(shape, 0.5, 0.5).difference(filled.buffer(tolerance + 1e-6)).area < 1e-6


# -- the merge of tiles' detections ----------------------------------------------------------------

def _piece(source: int, window, obj: np.ndarray, score: float) -> Piece | None:
    """What a tile that saw `obj` (image-size mask) through `window` detects: the part it sees."""
    x0, y0, x1, y1 = window
    seen = obj[y0:y1, x0:x1]
    if not seen.any():
        return None
    rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
    crop = MaskCrop(seen[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], x0 + int(cols[0]), y0 + int(rows[0]), obj.shape)
    box = np.array([crop.x0, crop.y0, crop.x1, crop.y1], np.float64)
    return Piece.from_crop(source, window, box, score, 1, crop)


@st.composite
def cut_objects(draw):
    """An image, its tiles, and one convex-ish object (an ellipse, a rectangle or a disk) anywhere,
    of any size up to the image, often across seams."""
    import cv2

    height, width = draw(st.integers(40, 400)), draw(st.integers(40, 400))
    tile = draw(st.integers(24, 200))
    overlap = draw(st.sampled_from([0.1, 0.2, 0.3, 0.5]))
    obj = np.zeros((height, width), np.uint8)
    cx, cy = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
    ax, ay = draw(st.integers(1, max(1, width // 2))), draw(st.integers(1, max(1, height // 2)))
    kind = draw(st.sampled_from(["ellipse", "rectangle"]))
    if kind == "ellipse":
        cv2.ellipse(obj, (cx, cy), (ax, ay), draw(st.integers(0, 179)), 0, 360, 1, -1)
    else:
        obj[max(0, cy - ay):cy + ay, max(0, cx - ax):cx + ax] = 1
    return obj.astype(bool), tile_windows(height, width, tile, overlap), draw(st.randoms(use_true_random=False))


class _Scores:
    """Stands for the strategy's random source: the given scores, in turn."""

    def __init__(self, *scores: float) -> None:
        self.scores = list(scores)

    def uniform(self, low: float, high: float) -> float:
        return self.scores.pop(0)


def _corner_pair() -> np.ndarray:
    obj = np.zeros((40, 41), bool)
    obj[0, 0:2] = True  # 1 pixel over the second tile's left edge, which scores best
    return obj


@settings(max_examples=150, **BOUNDED)
@given(cut_objects(), st.sampled_from(["iou", "ios"]))
@example((_corner_pair(), [(0, 0, 40, 40), (1, 0, 41, 40)], _Scores(0.6, 0.9)), "iou")
def test_an_object_cut_by_seams_is_found_once_with_its_own_mask(case, match):
    obj, windows, rng = case
    pieces = [p for k, w in enumerate(windows) if (p := _piece(k, w, obj, round(rng.uniform(0.5, 1.0), 4)))]
    # Tiles that see only a few pixels of the object: a model would not report them; neither do we.
    pieces = [p for p in pieces if p.area >= 8] or pieces
    if not pieces:
        return
    merged = merge_pieces(pieces, obj.shape, "nmm", match, 0.5)
    assert len(merged) == 1, [(p.source, p.rect, p.cut, p.area) for p in pieces]
    decoded = mask_utils.decode({"size": merged[0].rle["size"], "counts": merged[0].rle["counts"].encode()})
    kept = np.zeros_like(obj)
    for p in pieces:
        kept[p.rect[1]:p.rect[3], p.rect[0]:p.rect[2]] |= p.mask()
    # The instance is the object as far as the kept pieces show it: a tile that saw it whole gives
    # it exactly, else the union of the parts.
    assert np.array_equal(decoded.astype(bool), kept)
    assert merged[0].score == max(p.score for p in pieces)


# -- COCO readers ---------------------------------------------------------------------------------

WEIRD = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2**70, 2**70),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                  st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


def _valid_coco(draw, height: int, width: int) -> dict:
    """A small COCO file that loads: two images, two categories, polygon and RLE annotations."""
    annotations = []
    for a in range(draw(st.integers(1, 4))):
        x, y = draw(st.integers(0, width - 3)), draw(st.integers(0, height - 3))
        if draw(st.booleans()):
            segmentation = [[x, y, x + 2, y, x + 2, y + 2]]
        else:
            mask = np.zeros((height, width), np.uint8)
            mask[y:y + 2, x:x + 2] = 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            segmentation = {"size": [height, width], "counts": rle["counts"].decode()}
            if draw(st.booleans()):  # uncompressed
                segmentation["counts"] = rle_counts(rle).tolist()
        annotations.append({"id": a + 1, "image_id": draw(st.integers(1, 2)), "category_id": draw(st.integers(1, 2)),
                            "segmentation": segmentation, "bbox": [x, y, 2, 2], "area": 4.0, "iscrowd": 0})
    return {"images": [{"id": 1, "file_name": "a.png", "width": width, "height": height},
                       {"id": 2, "file_name": "b.png", "width": width, "height": height}],
            "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
            "annotations": annotations}


def _slots(value, path=()):
    """Every place in a JSON value: (container path, key) pairs."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path, key
            yield from _slots(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield path, index
            yield from _slots(item, path + (index,))


@st.composite
def messy_coco(draw, height: int = 6, width: int = 8) -> object:
    """A COCO file as annotation tools and hands write them: a valid one, then one to four edits,
    each replacing, removing or duplicating any value anywhere in it (a field, a list item, a
    number inside a polygon or an RLE) with something mistyped, out of range or absurd."""
    data = _valid_coco(draw, height, width)
    for _ in range(draw(st.integers(1, 4))):
        slots = list(_slots(data))
        if not slots:
            break
        path, key = draw(st.sampled_from(slots))
        container = data
        for step in path:
            container = container[step]
        action = draw(st.sampled_from(["replace", "replace", "replace", "remove", "duplicate"]))
        if action == "remove":
            del container[key]
        elif action == "duplicate" and isinstance(container, list):
            container.append(json.loads(json.dumps(container[key])))
        else:
            container[key] = draw(WEIRD)
    return data


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco_images")
    Image.new("RGB", (8, 6), (10, 20, 30)).save(folder / "a.png")
    Image.new("RGB", (8, 6), (30, 20, 10)).save(folder / "b.png")
    return folder


@settings(max_examples=1000, **BOUNDED)
@given(data=st.one_of(messy_coco(), WEIRD), raw=st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=30)))
def test_train_reader_loads_or_says_one_line(data, raw, image_folder):
    """`segcli train --coco`: load_coco either gives a dataset whose every instance decodes (what
    the training loop then does) or raises a SegcliError; never any other exception."""
    path = image_folder / "ann.json"
    path.write_bytes(raw if raw is not None else json.dumps(data).encode())
    try:
        dataset = load_coco(path, image_folder)
    except SegcliError as error:
        assert str(error) and "\n" not in str(error)
        return
    for record in dataset.images:
        for instance in record.instances:
            mask = decode_mask(instance.segmentation, record.height, record.width)
            assert mask.shape == (record.height, record.width)
            assert all(math.isfinite(v) for v in instance.box)
            x0, y0, x1, y1 = instance.box
            assert 0 <= x0 < x1 <= record.width and 0 <= y0 < y1 <= record.height


@settings(max_examples=1000, **BOUNDED)
@given(data=st.one_of(messy_coco(), WEIRD))
def test_eval_reader_loads_or_says_one_line(data):
    """`segcli eval --gt`: a ground truth pycocotools can use (every annotation's mask is read as
    COCOeval reads it, and the file scores against itself), or a SegcliError."""
    from segcli.evaluate.inputs import pycocotools_output

    try:
        truth = ground_truth_from_dataset(json.loads(json.dumps(data)))
    except SegcliError as error:
        assert str(error) and "\n" not in str(error)
        return
    coco = truth.coco
    with pycocotools_output(quiet=True):
        for ann in coco.dataset["annotations"]:
            if ann["image_id"] in coco.imgs and ann.get("segmentation") is not None:
                rle = coco.annToRLE(ann)  # what COCOeval does with it: rasterize, area, IoU
                mask_utils.area(rle)
                mask_utils.iou([rle], [rle], [0])
        # Its own annotations as predictions: normalize_results reads them or refuses them.
        predictions = [{**ann, "score": 0.5} if isinstance(ann, dict) else ann for ann in json.loads(json.dumps(data["annotations"]))]
        try:
            results = normalize_results(coco, predictions).results
        except SegcliError as error:
            assert "\n" not in str(error)
            return
        for result in results:
            if "segmentation" in result:
                mask_utils.area(result["segmentation"])
                mask_utils.iou([result["segmentation"]], [result["segmentation"]], [0])
