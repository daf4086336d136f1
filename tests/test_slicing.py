"""Sliced inference of huge images (`--slice`, `--overlap`): tiles, the merge across seams, every
output format and --resume, on large real images.

A seeded random model finds no real objects, so the seam logic is tested three ways: with exact
hand-made detections (merge_pieces), with a test double of the model at the tile level that
detects blobs only in the pixels it is given (pure-colour disks painted on a 6000 x 4000 mosaic of
real photos; the real nuclei of the 16-bit microscopy image), and with the shipped demo model on
synthetic shapes placed on the seams.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from segcli.cli import app
from segcli.data.decode import Decoded
from segcli.data.images import read_image
from segcli.data.sources import InputItem
from segcli.predict import core as predict_engine
from segcli.predict.core import Predictor
from segcli.predict.slice_merge import WHOLE_IMAGE, Piece, merge_pieces
from segcli.predict.slicing import SlicedPredictor, SliceSettings, tile_windows
from segcli.errors import UsageError
from segcli.model.maskrcnn import Detections
from segcli.model.preprocess import ResizePolicy, padded_size
from segcli.ops.rle_crops import MaskCrop, crop_to_rle
from segcli.weights import Checkpoint
from tests.conftest import SHARED_DATA, require, synthetic_shapes

MAGENTA = (255, 0, 255)


# -- a test double of the model at the tile level -------------------------------------------------

class BlobDetector:
    """Every 8-connected region of pixels that `hit` marks is one detection: its box, and as its
    28 x 28 mask the region's coverage of the box. Like the model it sees only the pixels it is
    given (a tile, or the downscaled whole image), so it sees cut objects cut."""

    def __init__(self, hit, resize: ResizePolicy = ResizePolicy(800, 1333), min_area: int = 30) -> None:
        self.hit, self.resize, self.min_area = hit, resize, min_area
        self.calls: list[list[tuple[int, int]]] = []

    def padded_input_size(self, height: int, width: int) -> tuple[int, int]:
        return padded_size(*self.resize.output_size(height, width))

    def __call__(self, images: torch.Tensor, sizes: list[tuple[int, int]]) -> Detections:
        self.calls.append(list(sizes))
        boxes, masks, index = [], [], []
        for i, (h, w) in enumerate(sizes):
            hit = self.hit(images[i, :h, :w].numpy()).astype(np.uint8)
            if not hit.any():
                continue
            count, labels, stats, _ = cv2.connectedComponentsWithStats(hit, connectivity=8)
            for k in range(1, count):
                x, y, bw, bh, area = (int(v) for v in stats[k])
                if area < self.min_area:
                    continue
                region = (labels[y:y + bh, x:x + bw] == k).astype(np.float32)
                masks.append(cv2.resize(region, (28, 28), interpolation=cv2.INTER_AREA))
                boxes.append([x, y, x + bw, y + bh])
                index.append(i)
        n = len(boxes)
        return Detections(
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            scores=torch.linspace(0.99, 0.6, n) if n else torch.zeros(0),  # distinct, best first
            labels=torch.ones(n, dtype=torch.int64),
            mask_probs=torch.from_numpy(np.stack(masks)) if n else torch.zeros((0, 28, 28)),
            image_index=torch.tensor(index, dtype=torch.int64),
            image_sizes=list(sizes),
        )


def blob_predictor(detector: BlobDetector) -> Predictor:
    checkpoint = Checkpoint(state_dict={}, arch="blob-detector", categories=[{"id": 1, "name": "blob"}],
                            label_to_category_id=[0, 1], source="blob-detector")
    return Predictor(detector, checkpoint, torch.device("cpu"))


def is_magenta(image: np.ndarray) -> np.ndarray:
    return cv2.inRange(np.ascontiguousarray(image), MAGENTA, MAGENTA) > 0


@pytest.fixture
def use_blob_detector(monkeypatch):
    """Runs of `segcli predict` get the blob detector instead of loading weights."""
    detector = BlobDetector(is_magenta)
    monkeypatch.setattr(predict_engine.Predictor, "load", classmethod(lambda cls, *a, **k: blob_predictor(detector)))
    return detector


# -- a 6000 x 4000 mosaic of real photos with disks on the seams ----------------------------------

TILE, OVERLAP = 1024, 0.2
HEIGHT, WIDTH = 4000, 6000


def disk(centre: tuple[int, int], radius: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.circle(mask, centre, radius, 1, -1)
    return mask.astype(bool)


def seam_disks() -> list[np.ndarray]:
    """Disks where the 1024-pixel tiles meet: cut by a tile's edge (whole in its neighbour), cut in
    both tiles of a seam, seen whole by the four tiles of a corner, larger than a tile (cut by
    several seams), inside a single tile, and cut by the image's own border."""
    windows = tile_windows(HEIGHT, WIDTH, TILE, OVERLAP)
    xs, ys = sorted({w[0] for w in windows}), sorted({w[1] for w in windows})
    assert xs[:4] == [0, 711, 1422, 2133] and ys[:3] == [0, 744, 1488]  # the places below rely on these
    return [
        disk((xs[0] + TILE, 500), 150),  # on tile 0's right edge; tile 1 sees it whole
        disk((2645, (ys[1] + TILE) // 2), 180),  # taller than the strip rows 0 and 1 share: cut in both
        disk(((xs[2] + xs[1] + TILE) // 2, (ys[2] + ys[1] + TILE) // 2), 120),  # in the corner four tiles share
        disk((4300, 2600), 760),  # 1520 px: larger than any tile
        disk((2645, 300), 60),  # inside one tile only
        disk((WIDTH - 40, HEIGHT - 300), 110),  # cut by the image border, in one tile
    ]


@pytest.fixture(scope="session")
def mosaic(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A folder with mosaic.png, 6000 x 4000, tiled from the real photos of fruits_nuts, with
    magenta disks painted on; and the disks' RLEs."""
    photos = [read_image(p) for p in sorted(require(SHARED_DATA / "fruits_nuts" / "images").glob("*.jpg"))]
    canvas = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for k, (y, x) in enumerate((y, x) for y in range(0, HEIGHT, 600) for x in range(0, WIDTH, 800)):
        photo = photos[k % len(photos)]
        part = canvas[y:y + 600, x:x + 800]
        part[...] = photo[:part.shape[0], :part.shape[1]]
    assert not is_magenta(canvas).any()  # the detector sees only what the test paints
    disks = seam_disks()
    for mask in disks:
        canvas[mask] = MAGENTA
    path = tmp_path_factory.mktemp("mosaic") / "mosaic.png"
    cv2.imwrite(str(path), canvas[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return path.parent, [rle(mask) for mask in disks]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def assert_one_instance_per_disk(rles: list[dict], disks: list[dict], min_iou: float = 0.9) -> None:
    """Exactly one instance per disk (RLEs), each matching its disk with at least `min_iou`."""
    ious = np.asarray(mask_utils.iou(rles, disks, [0] * len(disks))).reshape(len(rles), len(disks))
    assert len(rles) == len(disks), f"{len(rles)} instances for {len(disks)} disks; IoUs {ious.round(2).tolist()}"
    assert (ious.max(axis=0) >= min_iou).all(), ious.round(3).tolist()
    assert sorted(ious.argmax(axis=1).tolist()) == list(range(len(disks)))  # one each


def run_cli(*args: str) -> None:
    result = CliRunner().invoke(app, ["predict", *args, "-q"])
    assert result.exit_code == 0, result.output


def test_seam_cut_disks_on_a_6000x4000_real_mosaic_are_one_instance_each(use_blob_detector, mosaic, tmp_path):
    path, disks = mosaic
    out = tmp_path / "preds.json"
    run_cli(str(path), "--slice", str(TILE), "--overlap", str(OVERLAP), "--out", str(out), "--overlay",
            str(tmp_path / "overlays"), "--batch-size", "3")
    coco = json.loads(out.read_text())
    assert coco["images"] == [{"id": 1, "file_name": "mosaic.png", "width": WIDTH, "height": HEIGHT}]
    assert_one_instance_per_disk([a["segmentation"] for a in coco["annotations"]], disks)
    for annotation in coco["annotations"]:  # boxes hold their masks
        x, y, w, h = annotation["bbox"]
        mx, my, mw, mh = mask_utils.toBbox(annotation["segmentation"])
        assert x - 2 <= mx and mx + mw <= x + w + 2 and y - 2 <= my and my + mh <= y + h + 2
    # It ran as 1024-pixel tiles in batches of 3 (all one size, so they batch), then one
    # downscaled whole image.
    tiles = len(tile_windows(HEIGHT, WIDTH, TILE, OVERLAP))
    assert [len(call) for call in use_blob_detector.calls] == [3] * (tiles // 3) + [tiles % 3] + [1]
    sizes = [size for call in use_blob_detector.calls for size in call]
    assert sizes.count((TILE, TILE)) == tiles == len(sizes) - 1 and max(sizes[-1]) <= 1333
    overlay = cv2.imread(str(tmp_path / "overlays" / "mosaic.jpg"))
    assert overlay.shape == (HEIGHT, WIDTH, 3)


def test_without_the_merge_the_seams_would_split_the_disks(use_blob_detector, mosaic, tmp_path, monkeypatch):
    """What the test above guards against: the tiles' raw detections, unmerged, split every cut disk."""
    import segcli.predict.slicing as slicing

    path, disks = mosaic
    captured = {}

    def unmerged(pieces, image_size, *args):
        captured["pieces"] = pieces
        return merge_pieces(pieces, image_size, *args)

    monkeypatch.setattr(slicing, "merge_pieces", unmerged)
    run_cli(str(path), "--slice", str(TILE), "--no-slice-whole", "--out", str(tmp_path / "p.json"))
    pieces = captured["pieces"]
    placed = [crop_to_rle(p.mask(), p.rect[0], p.rect[1], HEIGHT, WIDTH) for p in pieces]
    ious = np.asarray(mask_utils.iou(placed, disks, [0] * len(disks)))
    per_disk = (ious > 0.01).sum(axis=0).tolist()
    assert per_disk[:3] == [2, 2, 4] and per_disk[3] >= 6 and per_disk[4:] == [1, 1], per_disk


def output_rles(fmt: str, out: Path) -> list[dict]:
    """The instances' masks as each format stores them (polygons filled as their readers fill them)."""
    if fmt == "coco":
        return [a["segmentation"] for a in json.loads(out.read_text())["annotations"]]
    if fmt == "coco-results":
        return [a["segmentation"] for a in json.loads(out.read_text())]
    if fmt == "jsonl":
        return [i["segmentation"] for line in out.read_text().splitlines() for i in json.loads(line)["instances"]]
    if fmt == "png":
        labels = cv2.imread(str(out / "mosaic.instances.png"), cv2.IMREAD_UNCHANGED)
        return [rle(labels == k) for k in range(1, int(labels.max()) + 1)]
    if fmt == "geojson":  # a MultiPolygon per instance; each polygon [exterior, *holes]
        outlines = [[polygon[0] for polygon in f["geometry"]["coordinates"]] for f in json.loads(out.read_text())["features"]]
    elif fmt == "labelme":  # a shape per part; parts of an instance share a group_id
        groups: dict[int, list] = {}
        for shape in json.loads((out / "mosaic.json").read_text())["shapes"]:
            groups.setdefault(shape["group_id"], []).append(shape["points"])
        outlines = list(groups.values())
    else:  # yolo: `class x1 y1 x2 y2 ...` normalized, a line per part
        outlines = [[np.array(line.split()[1:], np.float64).reshape(-1, 2) * (WIDTH, HEIGHT)]
                    for line in (out / "mosaic.txt").read_text().splitlines()]
    rles = []
    for parts in outlines:
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        cv2.fillPoly(mask, [np.round(np.array(p, np.float64)).astype(np.int32) for p in parts], 1)
        rles.append(rle(mask))
    return rles


@pytest.mark.parametrize("fmt", ["coco", "coco-results", "jsonl", "geojson", "labelme", "yolo", "png"])
def test_every_format_holds_one_instance_per_disk(use_blob_detector, mosaic, tmp_path, fmt):
    path, disks = mosaic
    out = tmp_path / ("out/" if fmt in ("labelme", "yolo", "png") else f"out.{'jsonl' if fmt == 'jsonl' else 'json'}")
    run_cli(str(path), "--slice", str(TILE), "--format", fmt, "--out", str(out))
    assert_one_instance_per_disk(output_rles(fmt, Path(str(out).rstrip("/"))), disks, min_iou=0.88)


def test_auto_slices_only_images_far_larger_than_the_model_input(use_blob_detector, mosaic, tmp_path):
    path, disks = mosaic
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), cv2.imread(str(path / "mosaic.png"))[:1200, :1600])  # 1.5x the detector's 800 x 1333
    out = tmp_path / "auto.jsonl"
    run_cli(str(path / "mosaic.png"), str(small), "--out", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    sizes = [size for call in use_blob_detector.calls for size in call]
    # The mosaic (the detector would shrink it 5x) ran as its input-size tiles, 800 x 800; the small one whole.
    assert sizes.count((800, 800)) == len(tile_windows(HEIGHT, WIDTH, 800, 0.2))
    assert (1200, 1600) in sizes
    assert_one_instance_per_disk([i["segmentation"] for i in lines[0]["instances"]], disks)
    use_blob_detector.calls.clear()
    run_cli(str(path), "--slice", "off", "--out", str(tmp_path / "off.jsonl"))
    assert [size for call in use_blob_detector.calls for size in call] == [(HEIGHT, WIDTH)]


def test_resume_keeps_sliced_results_and_refuses_other_slice_settings(use_blob_detector, mosaic, tmp_path):
    folder, _ = mosaic
    out = tmp_path / "preds.json"
    run_cli(str(folder), "--slice", str(TILE), "--out", str(out), "--resume")
    first = out.read_bytes()
    use_blob_detector.calls.clear()
    run_cli(str(folder), "--slice", str(TILE), "--out", str(out), "--resume")
    assert use_blob_detector.calls == [] and out.read_bytes() == first  # nothing predicted again
    for changed in (["--slice", "800"], ["--slice", str(TILE), "--overlap", "0.3"], ["--slice", "off"],
                    ["--slice", str(TILE), "--slice-merge", "nms"]):
        result = CliRunner().invoke(app, ["predict", str(folder), *changed, "--out", str(out), "--resume", "-q"])
        assert result.exit_code == 2 and "slice" in result.output, result.output
    assert out.read_bytes() == first


def test_video_frames_are_sliced_like_images(monkeypatch, tmp_path):
    """A real video's frames through the tiles: records keep their frame and timestamp, the overlay
    video is written, and every frame ran as 256-pixel tiles."""
    detector = BlobDetector(lambda pixels: pixels.min(axis=-1) > 200, ResizePolicy(128, 213))  # bright areas
    monkeypatch.setattr(predict_engine.Predictor, "load", classmethod(lambda cls, *a, **k: blob_predictor(detector)))
    video = require(SHARED_DATA / "videos" / "again.mkv")
    out = tmp_path / "frames.jsonl"
    run_cli(str(video), "--slice", "256", "--vid-stride", "25", "--out", str(out), "--overlay", str(tmp_path / "ov"))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 25, 50, 75] and lines[1]["timestamp"] > 0
    assert sum(len(line["instances"]) for line in lines) > 0
    sizes = [size for call in detector.calls for size in call]
    per_frame = len(tile_windows(480, 640, 256, 0.2))
    assert sizes.count((256, 256)) == 4 * per_frame and len(sizes) == 4 * (per_frame + 1)
    assert list((tmp_path / "ov").rglob("again.*"))  # the path as given, mirrored below the folder


# -- exact merges of hand-made detections ---------------------------------------------------------

def piece(source: int, window: tuple[int, int, int, int], mask: np.ndarray, score: float, category: int = 1,
          box: tuple | None = None) -> Piece:
    """The detection a tile would give for `mask` (image-size) as that tile sees it."""
    x0, y0, x1, y1 = window
    seen = np.zeros_like(mask)
    seen[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
    crop = MaskCrop(seen[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], int(cols[0]), int(rows[0]), mask.shape)
    box = box or (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return Piece.from_crop(source, window, np.array(box, np.float64), score, category, crop)


def small_disk(centre, radius, shape=(300, 500)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.circle(mask, centre, radius, 1, -1)
    return mask.astype(bool)


LEFT, RIGHT = (0, 0, 300, 300), (200, 0, 500, 300)  # two tiles sharing the strip x 200..300


def decoded(instance) -> np.ndarray:
    return mask_utils.decode(instance.rle).astype(bool)


def test_an_object_cut_by_a_seam_is_merged_back_exactly():
    obj = small_disk((320, 150), 60)  # mostly in RIGHT, cut by LEFT's edge at x = 300
    merged = merge_pieces([piece(0, LEFT, obj, 0.9), piece(1, RIGHT, obj, 0.8)], (300, 500))
    assert len(merged) == 1 and merged[0].pieces == 2 and merged[0].score == 0.9
    assert np.array_equal(decoded(merged[0]), obj)  # RIGHT saw it whole: its mask, exactly


def test_an_object_cut_in_every_tile_is_the_union_of_its_parts():
    obj = small_disk((250, 150), 140)  # wider than the shared strip: cut in both tiles
    merged = merge_pieces([piece(0, LEFT, obj, 0.7), piece(1, RIGHT, obj, 0.95, category=2)], (300, 500))
    assert len(merged) == 1
    assert np.array_equal(decoded(merged[0]), obj)
    assert merged[0].category_id == 2  # the best piece names it
    assert merged[0].box.tolist() == [110, 10, 391, 291]


def test_an_object_cut_by_four_tiles_is_one_instance():
    windows = [(0, 0, 300, 200), (200, 0, 500, 200), (0, 100, 300, 300), (200, 100, 500, 300)]
    obj = small_disk((250, 150), 45)  # inside the corner all four share: every tile sees it whole
    cross = small_disk((250, 150), 120)  # cut by every tile
    pieces = [piece(k, w, m, 0.9 - 0.01 * k - 0.1 * (m is cross)) for m in (obj, cross) for k, w in enumerate(windows)]
    merged = merge_pieces(pieces, (300, 500))
    assert sorted(m.pieces for m in merged) == [4, 4]
    assert sorted(int(decoded(m).sum()) for m in merged) == sorted([int(obj.sum()), int(cross.sum())])
    assert any(np.array_equal(decoded(m), cross) for m in merged)


def test_detections_of_one_tile_are_never_merged():
    a, b = small_disk((100, 150), 50), small_disk((110, 150), 50)  # IoU 0.8, both in LEFT
    assert len(merge_pieces([piece(0, LEFT, a, 0.9), piece(0, LEFT, b, 0.8)], (300, 500))) == 2


def test_neighbours_that_touch_across_a_seam_stay_two():
    a, b = small_disk((220, 150), 40), small_disk((300, 150), 40)  # touching at x = 260
    pieces = [piece(0, LEFT, a, 0.9), piece(1, RIGHT, a, 0.85), piece(0, LEFT, b, 0.8), piece(1, RIGHT, b, 0.75)]
    merged = merge_pieces(pieces, (300, 500))
    assert len(merged) == 2
    assert {int(decoded(m).sum()) for m in merged} == {int(a.sum()), int(b.sum())}


def test_a_small_object_on_a_large_one_survives_iou_but_not_ios():
    large, small = small_disk((300, 150), 100), small_disk((260, 150), 15)
    pieces = [piece(1, RIGHT, large, 0.95), piece(0, LEFT, small, 0.9, category=2)]
    assert len(merge_pieces(pieces, (300, 500), match="iou")) == 2
    assert len(merge_pieces(pieces, (300, 500), match="ios")) == 1


def test_nms_keeps_the_best_part_alone():
    obj = small_disk((250, 150), 140)
    pieces = [piece(0, LEFT, obj, 0.7), piece(1, RIGHT, obj, 0.95)]
    merged = merge_pieces(pieces, (300, 500), merge="nms")
    assert len(merged) == 1 and np.array_equal(decoded(merged[0]), _as_image(pieces[1]))


def _as_image(p: Piece, shape=(300, 500)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[p.rect[1]:p.rect[3], p.rect[0]:p.rect[2]] = p.mask()
    return mask


def test_a_cut_second_guess_of_another_class_is_not_kept_beside_the_object():
    obj = small_disk((320, 150), 60)
    part = obj & (np.arange(300) < 150)[:, None]  # a guess at the top half of LEFT's view of it
    for guess in (obj, part):
        pieces = [piece(1, RIGHT, obj, 0.95), piece(0, LEFT, obj, 0.9), piece(0, LEFT, guess, 0.5, category=3)]
        merged = merge_pieces(pieces, (300, 500))
        assert len(merged) == 1 and np.array_equal(decoded(merged[0]), obj)


def test_the_whole_image_pass_fills_in_only_what_no_tile_saw_whole():
    obj = small_disk((320, 150), 60)
    coarse = small_disk((322, 152), 63)  # the downscaled pass: about right, not exact
    image = (0, 0, 500, 300)
    merged = merge_pieces([piece(WHOLE_IMAGE, image, coarse, 0.99), piece(1, RIGHT, obj, 0.9)], (300, 500))
    assert len(merged) == 1 and np.array_equal(decoded(merged[0]), obj) and merged[0].score == 0.99
    big = small_disk((250, 150), 140)  # cut in both tiles: the union of all views
    merged = merge_pieces([piece(WHOLE_IMAGE, image, big, 0.99), piece(0, LEFT, big, 0.9), piece(1, RIGHT, big, 0.8)],
                          (300, 500))
    assert len(merged) == 1 and merged[0].pieces == 3 and np.array_equal(decoded(merged[0]), big)


def test_the_tile_that_saw_the_object_whole_gives_its_mask_whatever_the_scores():
    obj = small_disk((190, 150), 55)  # LEFT sees it whole; RIGHT sees x >= 200, cut by its edge
    pieces = [piece(1, RIGHT, obj, 0.99), piece(0, LEFT, obj, 0.9)]
    assert pieces[0].cut and not pieces[1].cut
    merged = merge_pieces(pieces, (300, 500))
    assert len(merged) == 1 and np.array_equal(decoded(merged[0]), obj) and merged[0].score == 0.99


def test_a_box_that_runs_to_the_tile_edge_marks_the_piece_cut():
    obj = small_disk((290, 150), 20)
    short = obj & (np.arange(500) < 297)[None, :]  # the mask stops 3 px before LEFT's edge at 300
    assert piece(0, LEFT, short, 0.9, box=(270, 130, 300, 170)).cut
    assert not piece(0, LEFT, short, 0.9, box=(270, 130, 297, 170)).cut
    assert not piece(0, (0, 0, 500, 300), small_disk((470, 150), 60), 0.9).cut  # the image's own border


def test_a_whole_piece_disagrees_with_pixels_outside_its_tile():
    """A tile that saw an object whole says all about it: a coarse whole-image detection that
    runs on past that tile (here over a second blob) is not the same object."""
    obj, other = small_disk((320, 150), 60), small_disk((90, 150), 85)
    merged = merge_pieces([piece(WHOLE_IMAGE, (0, 0, 500, 300), obj | other, 0.99), piece(1, RIGHT, obj, 0.9)],
                          (300, 500))
    assert len(merged) == 2 and any(np.array_equal(decoded(m), obj) for m in merged)


def test_tiles_guesses_of_one_class_go_together():
    """The model may name an object twice (per-class NMS); across tiles the guesses pair up by class,
    so each class appears once, as the model on the whole image would give them."""
    obj = small_disk((250, 150), 45)  # in the shared strip: both tiles see it whole
    pieces = [piece(0, LEFT, obj, 1.0, category=1), piece(1, RIGHT, obj, 0.95, category=2),
              piece(1, RIGHT, obj, 0.6, category=1)]
    merged = merge_pieces(pieces, (300, 500))
    assert sorted(m.category_id for m in merged) == [1, 2]


# -- tiles and settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("height, width, tile, overlap", [(4000, 6000, 1024, 0.2), (1000, 300, 256, 0.0),
                                                          (257, 5000, 256, 0.5), (100, 100, 256, 0.2)])
def test_tiles_cover_the_image_in_one_size_with_at_least_the_overlap(height, width, tile, overlap):
    windows = tile_windows(height, width, tile, overlap)
    covered = np.zeros((height, width), np.int32)
    for x0, y0, x1, y1 in windows:
        assert (x1 - x0, y1 - y0) == (min(tile, width), min(tile, height))
        assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    for axis in (0, 1):
        starts = sorted({w[axis] for w in windows})
        side = min(tile, (width, height)[axis])
        assert all(side - (b - a) >= round(overlap * side) - 1 for a, b in zip(starts, starts[1:]))


def test_auto_rule_slices_images_the_model_would_shrink_more_than_4x():
    auto, coco, demo = SliceSettings(), ResizePolicy(800, 1333), ResizePolicy(256, 427)
    assert auto.tile_for(3000, 4000, coco) is None  # a 12 MP photo runs whole
    assert auto.tile_for(4000, 6000, coco) == 800  # 24 MP: tiles of the model's input size
    assert auto.tile_for(10_000, 10_000, coco) == 800
    assert auto.tile_for(1024, 1024, demo) is None and auto.tile_for(1100, 1100, demo) == 256
    assert auto.tile_for(800, 4000, demo) == 256  # a strip: shrunk 9x to fit the model's 427 pixels
    assert SliceSettings(tile=1024).tile_for(1024, 900, coco) is None  # fits in one tile
    assert SliceSettings(tile=1024).tile_for(1025, 900, coco) == 1024


@pytest.mark.parametrize("flags, words", [
    (["--slice", "big"], "--slice 'big'"),
    (["--slice", "16"], "--slice must be at least 64"),
    (["--overlap", "-0.1"], "--overlap must be between 0 and 0.9"),
    (["--overlap", "0.95"], "--overlap must be between 0 and 0.9"),
    (["--overlap", "nan"], "--overlap"),
    (["--slice-merge", "wbf"], "--slice-merge 'wbf'"),
    (["--slice-match", "giou"], "--slice-match 'giou'"),
    (["--slice-match-thr", "0"], "--slice-match-thr"),
    (["--slice-match-thr", "1.5"], "--slice-match-thr"),
])
def test_bad_slice_values_are_one_line_usage_errors(flags, words, tmp_path):
    photo = require(SHARED_DATA / "fruits_nuts" / "images" / "0.jpg")
    out = tmp_path / "keep.json"
    out.write_text("previous")
    result = CliRunner().invoke(app, ["predict", str(photo), "--weights", "shapes_demo", "--out", str(out), *flags])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: ") and words in lines[0], result.output
    assert out.read_text() == "previous"


def test_settings_errors_are_usage_errors_in_process():
    with pytest.raises(UsageError):
        SliceSettings.parse("0x9", 0.2, "nmm", "iou", 0.5, True)
    assert SliceSettings.parse("off", 5.0, "x", "y", 9.0, True) is None  # off: the rest does not apply


# -- real 16-bit microscopy: the nuclei of tiles merge into the nuclei of the whole image ----------

def test_nuclei_of_a_tiled_16_bit_microscopy_image_merge_to_the_whole_image_nuclei(tmp_path):
    """img2d.tif (512 x 512, 16-bit) as a 2 x 2 mosaic of 1024 x 1024, in 256-pixel tiles: a
    bright-blob detector on the tiles, merged, gives the nuclei of the whole image (its bright
    regions, found on the whole image: the truth), one instance each, though 100-odd of them are
    cut by a tile's edge."""
    from PIL import Image

    source = np.array(Image.open(require(SHARED_DATA / "tiff16" / "img2d.tif")))
    assert source.dtype == np.uint16
    path = tmp_path / "mosaic16.tif"
    Image.fromarray(np.tile(source, (2, 2))).save(path)
    image = read_image(path)  # the 16-bit stretch is the reader's, over the whole image
    bright = lambda pixels: pixels[..., 0] > 60  # noqa: E731
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bright(image).astype(np.uint8), connectivity=8)
    truth = [rle(labels == k) for k in range(1, count) if stats[k, 4] >= 30]
    predictor = blob_predictor(BlobDetector(bright, ResizePolicy(256, 427)))
    sliced = SlicedPredictor(predictor, SliceSettings(tile=256, overlap=0.25, whole_image=False), max_det=1000)
    result = sliced.predict([Decoded(InputItem(path=path, file_name="mosaic16.tif"), 0, image, None)])[0]
    windows = tile_windows(1024, 1024, 256, 0.25)
    assert len(windows) == 25
    assert sum(1 for r in truth if _tiles_seeing(r, windows)[1] > 0) >= 100 and len(truth) >= 300
    assert len(result.rles) == len(truth)
    ious = np.asarray(mask_utils.iou(result.rles, truth, [0] * len(truth)))
    assert sorted(ious.argmax(axis=1).tolist()) == list(range(len(truth)))  # one each
    # The detector's 28 x 28 masks cost the smallest nuclei (40 pixels) up to 0.4 IoU whole or sliced.
    best = ious.max(axis=0)
    assert best.min() >= 0.5 and np.percentile(best, 5) >= 0.75 and np.median(best) >= 0.9


def _tiles_seeing(rle: dict, windows) -> tuple[int, int]:
    """(tiles that see some of the mask, tiles among them that see only part of it), by its box."""
    x, y, w, h = mask_utils.toBbox(rle)
    meets = [x0 < x + w and x < x1 and y0 < y + h and y < y1 for x0, y0, x1, y1 in windows]
    holds = [x0 <= x and x + w <= x1 and y0 <= y and y + h <= y1 for x0, y0, x1, y1 in windows]
    return sum(meets), sum(m and not h for m, h in zip(meets, holds))


# -- the shipped demo model on synthetic shapes placed on the seams ----------------------------------

def shapes_on_seams(seed: int, height: int, width: int, tile: int, overlap: float):
    """A textured canvas with demo-sized shapes centred on the seams of the tiles (and a few inside them)."""
    shapes = synthetic_shapes()
    rng = np.random.default_rng(seed)
    windows = tile_windows(height, width, tile, overlap)
    xs, ys = sorted({w[0] for w in windows}), sorted({w[1] for w in windows})
    seams_x = [(a + tile + b) // 2 for a, b in zip(xs, xs[1:])]
    seams_y = [(a + tile + b) // 2 for a, b in zip(ys, ys[1:])]
    centres = [(x, (y0 + tile // 2)) for x in seams_x for y0 in ys] + [(x0 + tile // 2, y) for y in seams_y for x0 in xs]
    image = shapes.textured_background(rng, max(height, width))[:height, :width]
    truth = []
    for cx, cy in centres:
        kind = int(rng.integers(len(shapes.CLASSES)))
        patch = shapes.shape_mask(rng, shapes.CLASSES[kind], 256)
        ys_, xs_ = np.nonzero(patch)
        mask = np.zeros((height, width), bool)
        yy, xx = ys_ - int(ys_.mean()) + cy, xs_ - int(xs_.mean()) + cx
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        mask[yy[inside], xx[inside]] = True
        if any((mask & other).any() for _, other in truth):
            continue
        image = np.where(mask[..., None], rng.uniform(0, 255, 3) + rng.normal(0, 12, (height, width, 1)), image)
        truth.append((shapes.CATEGORY_IDS[kind], mask))
    return np.clip(image, 0, 255).astype(np.uint8), truth


def test_demo_model_finds_shapes_cut_by_seams_once(tmp_path):
    height, width, tile = 512, 768, 256
    image, truth = shapes_on_seams(11, height, width, tile, 0.2)
    windows = tile_windows(height, width, tile, 0.2)
    seen = [_tiles_seeing(rle(mask), windows) for _, mask in truth]
    assert len(truth) >= 10 and all(tiles >= 2 for tiles, _ in seen) and sum(cut > 0 for _, cut in seen) >= 8
    path = tmp_path / "seams.png"
    cv2.imwrite(str(path), image[..., ::-1])
    out = tmp_path / "sliced.json"
    run_cli(str(path), "--weights", "shapes_demo", "--slice", str(tile), "--out", str(out), "--device", "cpu")
    annotations = json.loads(out.read_text())["annotations"]
    masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in annotations]
    # Every shape cut by a seam is found, as one whole shape...
    ious = np.array([[mask_iou(m, t) for _, t in truth] for m in masks])
    assert (ious.max(axis=0) >= 0.75).all(), ious.max(axis=0).round(2)
    # ... and never twice under one name (the model's own NMS keeps one per class; a seam that
    # split a shape would leave two).
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            if annotations[i]["category_id"] == annotations[j]["category_id"]:
                assert mask_iou(masks[i], masks[j]) < 0.3
    # Unsliced, the model sees these shapes at half their size and misses some (for contrast).
    whole = tmp_path / "whole.json"
    run_cli(str(path), "--weights", "shapes_demo", "--slice", "off", "--out", str(whole), "--device", "cpu")
    whole_masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in json.loads(whole.read_text())["annotations"]]
    found_whole = sum(max((mask_iou(m, t) for m in whole_masks), default=0) >= 0.75 for _, t in truth)
    assert found_whole < len(truth)


def test_candidates_below_the_threshold_leave_sliced_results_unchanged(tmp_path):
    """--review (and --track) run the model below --score-thr; in a sliced image those candidates
    are merged apart from the kept detections, so the outputs are those of a plain run."""
    image, _ = shapes_on_seams(11, 512, 768, 256, 0.2)
    path = tmp_path / "seams.png"
    cv2.imwrite(str(path), image[..., ::-1])
    common = (str(path), "--weights", "shapes_demo", "--slice", "256", "--device", "cpu")
    run_cli(*common, "--out", str(tmp_path / "plain.json"))
    run_cli(*common, "--out", str(tmp_path / "reviewed.json"), "--review", str(tmp_path / "review.csv"))
    with open(tmp_path / "review.csv", newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert int(row["below_threshold"]) > 0  # there were candidates to keep apart
    plain, reviewed = (json.loads((tmp_path / name).read_text()) for name in ("plain.json", "reviewed.json"))
    assert plain["annotations"] == reviewed["annotations"] and len(plain["annotations"]) >= 10
