"""The review queue: its components computed by hand; corrupted and blank images rank above clean
ones with the demo model; `segcli review FILE` gives the rows `predict --review` gives; the flip
check; the CSV after Ctrl-C and with --resume; one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from segcli.cli import app
from segcli.predict import core as engine
from segcli.predict.core import ImagePrediction
from segcli.predict.options import PredictOptions
from segcli.predict.run import run_predict
from segcli.predict.review import COLUMNS, REVIEW_BAND, ReviewSettings, review_row
from segcli.errors import UsageError
from segcli.weights import Checkpoint
from tests.conftest import synthetic_shapes


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def instance(score: float, box: tuple[int, int, int, int], mask_box: tuple[int, int, int, int] | None = None) -> dict:
    """An instance with box [x, y, w, h] and a rectangular mask (its box unless `mask_box` says)."""
    mask = np.zeros((100, 100), bool)
    x, y, w, h = mask_box or box
    mask[y:y + h, x:x + w] = True
    return {"score": score, "bbox": list(box), "segmentation": rle_of(mask), "category_id": 1}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -- the components, by hand ---------------------------------------------------------------------

def test_nothing_found_scores_one():
    row = review_row("blank.png", None, [], [], 0.5)
    assert (row.low_confidence, row.near_threshold, row.mask_box, row.score) == (1.0, 0.0, 0.0, 1.0)


def test_each_component_as_documented():
    # One detection at 0.75 (threshold 0.5), mask = its box: halfway confident, nothing else.
    row = review_row("a.png", None, [instance(0.75, (10, 10, 20, 20))], [], 0.5)
    assert row.low_confidence == pytest.approx(0.5) and row.near_threshold == 0 and row.mask_box == 0
    assert row.score == pytest.approx(0.5)
    # Scores near the threshold: 0.5 counts 1, 0.3 counts 1 - 0.2 / 0.25, 0.1 is too far to count.
    row = review_row("a.png", None, [instance(0.75, (10, 10, 20, 20))], [0.5, 0.3, 0.1], 0.5)
    assert row.near_threshold == pytest.approx(1 - math.exp(-(1 + (1 - 0.2 / REVIEW_BAND))))
    assert row.below_threshold == 2 and row.detections == 1
    # A mask covering the left half of its box: IoU(box, mask's box) = 0.5.
    row = review_row("a.png", None, [instance(1.0, (10, 10, 20, 20), mask_box=(10, 10, 10, 20))], [], 0.5)
    assert row.low_confidence == 0 and row.mask_box == pytest.approx(0.5)
    # The score: 1 - product of (1 - component), the flip included when given.
    row = review_row("a.png", None, [instance(0.75, (10, 10, 20, 20), mask_box=(10, 10, 10, 20))], [], 0.5, flip=0.2)
    assert row.score == pytest.approx(1 - (1 - 0.5) * (1 - 0.5) * (1 - 0.2))


# -- corrupted images and the demo model ----------------------------------------------------------

CLEAN = 6


@pytest.fixture(scope="module")
def shapes_review(tmp_path_factory):
    """Clean synthetic shapes and corrupted copies; predicted at 0.5 with --review --review-flip,
    and once more at 0.25 for `segcli review`."""
    root = tmp_path_factory.mktemp("review")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(11)
    sources = {}
    for k in range(CLEAN):
        image, _ = synthetic_shapes().make_image(rng, 256)
        cv2.imwrite(str(folder / f"clean_{k}.png"), image[..., ::-1])
        sources[f"clean_{k}.png"] = image
    corrupted = {
        "blank.png": ("clean_0.png", np.full((256, 256, 3), 128, np.uint8)),
        "noise.png": ("clean_1.png", np.clip(sources["clean_1.png"] + rng.normal(0, 80, (256, 256, 3)), 0, 255)),
        "blur.png": ("clean_2.png", cv2.GaussianBlur(sources["clean_2.png"], (0, 0), 8)),
        "stripes.png": ("clean_3.png", np.where(np.arange(256)[:, None, None] % 4 < 2, sources["clean_3.png"], 0)),
    }
    for name, (_, image) in corrupted.items():
        cv2.imwrite(str(folder / name), np.asarray(image, np.uint8)[..., ::-1])
    settings = dict(weights="shapes_demo", device="cpu", precision="fp32", workers=0, progress=False, quiet=True)
    run_predict(PredictOptions(sources=[str(folder)], out=str(root / "at50.json"), score_thr=0.5,
                               review=ReviewSettings(str(root / "review.csv"), flip=True), **settings))
    run_predict(PredictOptions(sources=[str(folder)], out=str(root / "at25.json"), score_thr=0.25, **settings))
    return root, {name: source for name, (source, _) in corrupted.items()}


def test_corrupted_and_blank_images_rank_above_clean_ones(shapes_review):
    root, made_from = shapes_review
    rows = read_rows(root / "review.csv")
    assert list(rows[0]) == list(COLUMNS) and len(rows) == CLEAN + len(made_from)
    rank = {row["file"]: int(row["rank"]) for row in rows}
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    clean = [rank[f"clean_{k}.png"] for k in range(CLEAN)]
    assert rank["blank.png"] < min(clean) and rank["noise.png"] < min(clean)
    for name, source in made_from.items():  # every corruption ranks above the clean image it was made from
        assert rank[name] < rank[source], (name, rows)
    assert np.mean([rank[name] for name in made_from]) < np.mean(clean)
    # The flip check ran: clean shapes look the same mirrored, noise does not.
    flips = {row["file"]: float(row["flip"]) for row in rows}
    assert flips["noise.png"] > max(flips[f"clean_{k}.png"] for k in range(CLEAN))


def as_json_lines(coco_file: Path, out: Path) -> Path:
    """A COCO file from segcli predict rewritten as its JSON Lines twin (one record per image)."""
    coco = json.loads(coco_file.read_text())
    lines = []
    for image in coco["images"]:
        instances = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        lines.append(json.dumps({"file": image["file_name"], "frame": None, "width": image["width"],
                                 "height": image["height"], "instances": instances}))
    out.write_text("\n".join(lines) + "\n")
    return out


def test_review_of_a_predictions_file_gives_the_rows_of_predict_review(shapes_review, tmp_path):
    root, _ = shapes_review
    during = {row["file"]: row for row in read_rows(root / "review.csv")}
    for path in (root / "at25.json", as_json_lines(root / "at25.json", tmp_path / "at25.jsonl")):
        out = tmp_path / f"{path.name}.csv"
        result = CliRunner().invoke(app, ["review", str(path), "--score-thr", "0.5", "--out", str(out)])
        assert result.exit_code == 0, result.output
        from_file = {row["file"]: row for row in read_rows(out)}
        assert set(from_file) == set(during)
        for name, row in during.items():
            for column in ("low_confidence", "near_threshold", "mask_box"):
                assert float(from_file[name][column]) == pytest.approx(float(row[column]), abs=2e-4), (name, column)
            assert (from_file[name]["detections"], from_file[name]["below_threshold"]) == \
                (row["detections"], row["below_threshold"])
            assert from_file[name]["flip"] == ""  # a file cannot say what the mirror image would give


def test_review_leaves_the_outputs_unchanged_and_masks_only_what_is_written(shapes_review, tmp_path, monkeypatch):
    """The candidates below --score-thr that --review counts get no mask: the mask head runs on
    the written detections alone, and they come out as without --review."""
    from segcli.model.roi_heads import RoIHeads

    root, _ = shapes_review
    masked: list[int] = []
    original = RoIHeads.mask_probabilities
    monkeypatch.setattr(RoIHeads, "mask_probabilities",
                        lambda self, pyramid, found: masked.append(len(found.scores)) or original(self, pyramid, found))
    settings = dict(weights="shapes_demo", device="cpu", precision="fp32", workers=0, progress=False, quiet=True)
    run_predict(PredictOptions(sources=[str(root / "images")], out=str(tmp_path / "plain.json"), **settings))
    plain_masks, masked[:] = sum(masked), []
    run_predict(PredictOptions(sources=[str(root / "images")], out=str(tmp_path / "reviewed.json"),
                               review=ReviewSettings(str(tmp_path / "review.csv")), **settings))
    plain, reviewed = (json.loads((tmp_path / n).read_text())["annotations"] for n in ("plain.json", "reviewed.json"))
    assert reviewed == plain == json.loads((root / "at50.json").read_text())["annotations"]
    assert sum(masked) == plain_masks == len(plain)
    assert sum(int(row["below_threshold"]) for row in read_rows(tmp_path / "review.csv")) > 0  # candidates were there


# -- the flip check, with stand-in models --------------------------------------------------------

class BlobModel:
    """Bright blobs are objects: exactly mirror-symmetric (or, `lopsided`, always one box at the left)."""

    def __init__(self, lopsided: bool = False, interrupt_after: int | None = None) -> None:
        self.lopsided = lopsided
        self.interrupt_after = interrupt_after
        self.calls = 0
        self.checkpoint = Checkpoint(state_dict={}, arch="blobs", categories=[{"id": 1, "name": "blob"}],
                                     label_to_category_id=[0, 1], meta={}, source="blobs")
        self.device = torch.device("cpu")

    def predict(self, decoded: list) -> list[ImagePrediction]:
        return [self._one(item) for item in decoded]

    def _one(self, decoded) -> ImagePrediction:
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        image = decoded.image
        bright = (image.max(axis=2) > 200).astype(np.uint8)
        if self.lopsided:
            bright[:] = 0
            bright[10:30, 5:25] = 1
        count, labels, stats, _ = cv2.connectedComponentsWithStats(bright)
        blobs = [k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= 20]
        boxes = [[stats[k, 0], stats[k, 1], stats[k, 0] + stats[k, 2], stats[k, 1] + stats[k, 3]] for k in blobs]
        scores = [0.9 if self.lopsided else float(image[labels == k].mean()) / 255 for k in blobs]
        height, width = image.shape[:2]
        return ImagePrediction(decoded.item, width, height, np.array(boxes, np.float32).reshape(-1, 4),
                               np.array(scores, np.float32), np.ones(len(blobs), np.int64),
                               [rle_of(labels == k) for k in blobs], decoded.frame, decoded.timestamp)


@pytest.fixture
def blob_images(tmp_path) -> Path:
    folder = tmp_path / "blobs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for k in range(4):
        image = np.zeros((64, 96, 3), np.uint8)
        for _ in range(2):
            x, y = rng.integers(0, 70), rng.integers(0, 40)
            image[y:y + 15, x:x + 20] = rng.integers(210, 256)
        cv2.imwrite(str(folder / f"b{k}.png"), image)
    return folder


def use_model(monkeypatch, model) -> None:
    monkeypatch.setattr(engine.Predictor, "load", classmethod(lambda cls, *args, **kwargs: model))


def blob_options(folder: Path, out: Path, review: Path, **extra) -> PredictOptions:
    flip = extra.pop("flip", True)
    # slice="off": the stand-in models are not networks that sliced inference could tile
    return PredictOptions(sources=[str(folder)], out=str(out), workers=0, progress=False, quiet=True, slice="off",
                          review=ReviewSettings(str(review), flip=flip), **extra)


def test_flip_is_zero_for_a_mirror_symmetric_model_and_one_for_a_lopsided_one(monkeypatch, blob_images, tmp_path):
    use_model(monkeypatch, model := BlobModel())
    run_predict(blob_options(blob_images, tmp_path / "p.json", tmp_path / "r.csv"))
    assert model.calls == 8  # each image and its mirror image
    assert [float(r["flip"]) for r in read_rows(tmp_path / "r.csv")] == [0.0] * 4
    use_model(monkeypatch, BlobModel(lopsided=True))
    run_predict(blob_options(blob_images, tmp_path / "q.json", tmp_path / "s.csv"))
    assert [float(r["flip"]) for r in read_rows(tmp_path / "s.csv")] == [1.0] * 4
    use_model(monkeypatch, model := BlobModel())
    run_predict(blob_options(blob_images, tmp_path / "t.json", tmp_path / "u.csv", flip=False))
    assert model.calls == 4 and all(r["flip"] == "" for r in read_rows(tmp_path / "u.csv"))


def test_ctrl_c_writes_the_csv_of_what_was_finished_and_resume_completes_it(monkeypatch, blob_images, tmp_path):
    out, review = tmp_path / "p.json", tmp_path / "review.csv"
    use_model(monkeypatch, BlobModel(interrupt_after=5))  # images 1 and 2 (and their mirrors), then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        run_predict(blob_options(blob_images, out, review))
    assert sorted(r["file"] for r in read_rows(review)) == ["b0.png", "b1.png"]
    use_model(monkeypatch, model := BlobModel())
    run_predict(blob_options(blob_images, out, review, resume=True))
    assert model.calls == 4  # only b2 and b3, with their mirrors
    resumed = read_rows(review)
    use_model(monkeypatch, BlobModel())
    run_predict(blob_options(blob_images, tmp_path / "whole.json", tmp_path / "whole.csv"))
    assert resumed == read_rows(tmp_path / "whole.csv")  # the same rows as one run over everything
    with pytest.raises(UsageError, match="review"):  # without the flip, the rows would differ: refused
        run_predict(blob_options(blob_images, out, review, resume=True, flip=False))


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "args, words",
    [
        (["predict", "{image}", "--out", "{tmp}/p.json", "--review-flip"], "--review-flip needs --review"),
        (["predict", "{image}", "--out", "{tmp}/p.json", "--review", "{tmp}"], "is a folder"),
        (["predict", "{image}", "--out", "{tmp}/p.json", "--review", "{tmp}/p.json"], "would be the same file"),
        (["predict", "{image}", "--out", "{tmp}/p.json", "--review", "{image}"], "would overwrite the input"),
        (["predict", "{image}", "--out", "{tmp}/p.json", "--review", "{tmp}/r.csv", "--ray"], "not on Ray"),
        (["review", "{tmp}/missing.json"], "no such file"),
        (["review", "{tmp}/gt.json"], "without a score"),
        (["review", "{tmp}/gt.json", "--score-thr", "2"], "--score-thr"),
        (["review", "{tmp}/results.json"], "results list"),
        (["review", "{tmp}/gt.json", "--out", "{tmp}"], "is a folder"),
        (["review", "{tmp}/gt.json", "--out", "{tmp}/gt.json"], "would overwrite the predictions file"),
    ],
)
def test_bad_review_usage_is_one_line_and_exit_2(args, words, tmp_path):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "gt.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}], "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0}]}))
    (tmp_path / "results.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                                                        "score": 0.9}]))
    result = CliRunner().invoke(app, [a.format(image=image, tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: ") and words in lines[0], result.output
    assert not (tmp_path / "p.json").exists()
