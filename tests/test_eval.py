"""`segcli eval` against pycocotools run by hand on the same files: every stat of both IoU types
and every per-class AP must be equal to the last digit.

Predictions are made from real ground truth (coco_tiny, fruits_nuts) with seeded noise: jittered
boxes, eroded and dilated masks, dropped objects, confused classes, false detections, some masks
as polygons. The reference side is the textbook use of pycocotools: `COCO(gt)`, `loadRes`,
`COCOeval` evaluate/accumulate/summarize, with per-class AP as the mean of `eval["precision"]`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segcli.cli.app import app
from segcli.evaluate.run import STAT_NAMES, evaluate_coco, evaluate_files, run_evaluation_files
from segcli.evaluate.plots import COLOURS, pr_curves
from segcli.writers.coco import CocoWriter
from tests.conftest import SHARED_DATA, require

COCO_TINY_VAL = SHARED_DATA / "coco_tiny" / "annotations" / "instances_val2017.json"
COCO_TINY_TRAIN = SHARED_DATA / "coco_tiny" / "annotations" / "instances_train2017.json"
FRUITS_NUTS = SHARED_DATA / "fruits_nuts" / "annotations.json"
GROUND_TRUTHS = {"coco_tiny_val": COCO_TINY_VAL, "coco_tiny_train": COCO_TINY_TRAIN, "fruits_nuts": FRUITS_NUTS}


# --------------------------------------------------------------------------------------------
# Noisy predictions and the reference


def noisy_predictions(gt_path: Path, seed: int = 0, polygon_share: float = 0.3, boxes: bool = True) -> list[dict]:
    """A results list (ground-truth image ids) that scores somewhere between 0 and 1 on every stat."""
    return copy.deepcopy(_noisy_predictions(gt_path, seed, polygon_share, boxes))


@functools.lru_cache(maxsize=None)  # the same noise is asked for by several tests: make it once
def _noisy_predictions(gt_path: Path, seed: int, polygon_share: float, boxes: bool) -> list[dict]:
    rng = np.random.default_rng(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    category_ids = sorted(gt.getCatIds())
    results = []
    for ann in gt.dataset["annotations"]:
        if ann["iscrowd"] or rng.random() < 0.15:  # missed objects
            continue
        image = gt.imgs[ann["image_id"]]
        mask = gt.annToMask(ann)
        size = int(rng.integers(1, 4)) * 2 + 1
        if rng.random() < 0.7:
            mask = cv2.erode(mask, np.ones((size, size), np.uint8))
        else:
            mask = cv2.dilate(mask, np.ones((size, size), np.uint8))
        x, y, w, h = ann["bbox"]
        box = [x + rng.normal(0, 0.06 * w + 0.5), y + rng.normal(0, 0.06 * h + 0.5),
               w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)]
        category = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(category_ids))
        result = {"image_id": ann["image_id"], "category_id": category, "score": float(rng.uniform(0.05, 1.0)),
                  "segmentation": _mask_segmentation(mask, rng.random() < polygon_share)}
        if boxes:
            result["bbox"] = [float(v) for v in box]
        results.append(result)
        if rng.random() < 0.1:  # a duplicate detection of the same object, lower score
            results.append({**copy.deepcopy(result), "score": result["score"] * 0.5})
    for image_id, image in gt.imgs.items():  # false detections
        for _ in range(3):
            w, h = rng.uniform(8, image["width"] / 3), rng.uniform(8, image["height"] / 3)
            x, y = rng.uniform(0, image["width"] - w), rng.uniform(0, image["height"] - h)
            mask = np.zeros((image["height"], image["width"]), np.uint8)
            cv2.ellipse(mask, (int(x + w / 2), int(y + h / 2)), (int(w / 2), int(h / 2)), 0, 0, 360, 1, -1)
            result = {"image_id": image_id, "category_id": int(rng.choice(category_ids)),
                      "score": float(rng.uniform(0.05, 0.8)), "segmentation": _mask_segmentation(mask, False)}
            if boxes:
                result["bbox"] = [x, y, w, h]
            results.append(result)
    return results


def _mask_segmentation(mask: np.ndarray, as_polygon: bool):
    if as_polygon:
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polygons = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
        if polygons:
            return polygons
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def by_hand(gt_path: Path | dict, results: list[dict], iou_type: str) -> tuple[list[float], dict[str, float]]:
    """pycocotools as its README uses it; per-class AP the way detectron2 and others take it."""
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt_path, dict):
            gt = COCO()
            gt.dataset = copy.deepcopy(gt_path)
            gt.createIndex()
        else:
            gt = COCO(str(gt_path))
        detections = gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(gt, detections, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        precision = evaluator.eval["precision"][:, :, k, 0, -1]
        precision = precision[precision > -1]
        if precision.size:
            per_class[gt.cats[category_id]["name"]] = float(np.mean(precision))
    return [float(v) for v in evaluator.stats], per_class


def assert_same_as_by_hand(report: dict, gt: Path | dict, results: list[dict], iou_types=("segm", "bbox")) -> None:
    assert set(report) == {*iou_types, "per_class"}
    for iou_type in iou_types:
        stats, per_class = by_hand(gt, results, iou_type)
        assert [report[iou_type][name] for name in STAT_NAMES] == stats, iou_type  # exact, not approx
        assert report["per_class"][iou_type] == per_class, iou_type
        # The noise leaves every number strictly between 0 and 1, so a wrong pairing cannot pass.
        assert 0.05 < report[iou_type]["AP"] < 0.95, (iou_type, report[iou_type]["AP"])


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize("name", sorted(GROUND_TRUTHS))
def test_results_list_scores_equal_pycocotools_by_hand(name, tmp_path):
    gt = require(GROUND_TRUTHS[name])
    results = noisy_predictions(gt, seed=len(name))
    assert any(isinstance(r["segmentation"], list) for r in results)  # some polygons in the mix
    path = write_json(tmp_path / "results.json", results)
    report = evaluate_files(gt, path)
    assert_same_as_by_hand(report, gt, results)
    assert evaluate_files(gt, results) == report  # the parsed list gives the same


def test_segcli_predict_dataset_file_is_matched_by_file_name(tmp_path):
    """What `segcli predict` writes: its own image ids (in another order), file_name relative to the
    source folder, RLE masks, rounded boxes and scores. An image the ground truth lacks is ignored."""
    gt_path = require(COCO_TINY_TRAIN)
    gt = json.loads(gt_path.read_text())
    results = noisy_predictions(gt_path, seed=3, polygon_share=0.0)
    images = sorted(gt["images"], key=lambda image: image["file_name"], reverse=True)
    out = tmp_path / "preds.json"
    with CocoWriter(out, gt["categories"]) as writer:
        for index, image in enumerate(images):
            mine = [r for r in results if r["image_id"] == image["id"]]
            # Half in a subfolder: the ground truth's bare names pair with them by base name.
            name = f"train2017/{image['file_name']}" if index % 2 else image["file_name"]
            writer.add_image(name, image["width"], image["height"],
                             np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)]),
                             np.array([r["score"] for r in mine]), np.array([r["category_id"] for r in mine]),
                             [r["segmentation"] for r in mine])
        stray = results[0]
        writer.add_image("not/in/the/ground_truth.jpg", 640, 480, np.array([[0, 0, 50, 50]]), np.array([0.9]),
                         np.array([stray["category_id"]]), [_mask_segmentation(np.ones((480, 640), np.uint8), False)])
    written = json.loads(out.read_text())
    # By hand: pair the images by name ourselves and give pycocotools the ground truth's ids.
    gt_id = {image["file_name"]: image["id"] for image in gt["images"]}
    by_name = {image["id"]: gt_id.get(Path(image["file_name"]).name) for image in written["images"]}
    expected = [{k: a[k] for k in ("category_id", "bbox", "score", "segmentation")} | {"image_id": by_name[a["image_id"]]}
                for a in written["annotations"] if by_name[a["image_id"]] is not None]
    evaluation = run_evaluation_files(gt_path, out)
    assert_same_as_by_hand(evaluation.report, gt_path, expected)
    assert any("ground_truth.jpg" in w and "1 predicted images not in the ground truth" in w
               for w in evaluation.warnings), evaluation.warnings


def test_polygons_and_uncompressed_rle_without_boxes(tmp_path):
    """Masks only, as polygons or uncompressed RLE: converted against the ground-truth image size,
    as pycocotools' annToRLE converts them (by hand they must be converted first: loadRes takes
    only compressed RLE when results have no boxes)."""
    gt_path = require(FRUITS_NUTS)
    results = noisy_predictions(gt_path, seed=5, polygon_share=0.5, boxes=False)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    converted = []
    for index, result in enumerate(results):
        image = gt.imgs[result["image_id"]]
        segmentation = result["segmentation"]
        if index % 5 == 0 and isinstance(segmentation, dict):  # some as uncompressed RLE
            mask = mask_utils.decode(segmentation)
            flat = mask.flatten(order="F")
            changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
            result["segmentation"] = {"size": segmentation["size"], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
        segmentation = result["segmentation"]
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, image["height"], image["width"]))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, image["height"], image["width"])
        else:
            rle = segmentation
        converted.append({**result, "segmentation": rle})
    assert any(isinstance(r["segmentation"], list) for r in results)
    assert any(isinstance(r["segmentation"], dict) and isinstance(r["segmentation"]["counts"], list) for r in results)
    report = evaluate_files(gt_path, write_json(tmp_path / "masks_only.json", results))
    assert_same_as_by_hand(report, gt_path, converted)


def test_unknown_images_and_categories_are_reported_and_ignored(tmp_path, capsys):
    gt_path = require(COCO_TINY_VAL)
    results = noisy_predictions(gt_path, seed=7)
    extra = [{**results[0], "image_id": 123456789}, {**results[1], "image_id": 123456789},
             {**results[2], "category_id": 999}]
    path = write_json(tmp_path / "results.json", results + extra)
    code, out, err = run_cli(capsys, "eval", "--gt", str(gt_path), "--pred", str(path), "--report", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "2 predictions for 1 images not in the ground truth ignored (image ids 123456789)" in err
    assert "1 predictions of category ids 999 not in the ground truth ignored" in err
    assert_same_as_by_hand(json.loads((tmp_path / "r.json").read_text()), gt_path, results)


def test_boxes_only_results_score_bbox_and_say_segm_cannot_run(tmp_path, capsys):
    gt_path = require(FRUITS_NUTS)
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in noisy_predictions(gt_path, seed=9)]
    path = write_json(tmp_path / "boxes.json", results)
    code, out, err = run_cli(capsys, "eval", "--gt", str(gt_path), "--pred", str(path), "--report", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "have no mask (segmentation); segm evaluation cannot run; scoring bbox only" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert_same_as_by_hand(report, gt_path, results, iou_types=("bbox",))
    code, out, err = run_cli(capsys, "eval", "--gt", str(gt_path), "--pred", str(path), "--iou-type", "segm")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "segm evaluation cannot run" in err


def test_in_memory_api_for_training_matches_files_and_leaves_inputs_alone(tmp_path):
    gt_path = require(COCO_TINY_VAL)
    results = noisy_predictions(gt_path, seed=11)
    before = copy.deepcopy(results)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        first = evaluate_coco(gt, results)
        second = evaluate_coco(gt, results, iou_types="segm,bbox")  # the same COCO object, reused
    assert stdout.getvalue() == ""  # pycocotools' chatter stays off stdout
    assert results == before
    assert first == second == evaluate_files(gt_path, write_json(tmp_path / "r.json", results))
    assert evaluate_coco(gt, results, iou_types=("bbox",)).keys() == {"bbox", "per_class"}


def test_no_predictions_scores_zero_and_categories_without_ground_truth_are_left_out(tmp_path):
    gt_path = require(COCO_TINY_VAL)
    report = evaluate_files(gt_path, [])
    for iou_type in ("segm", "bbox"):
        assert report[iou_type]["AP"] == 0.0 and report[iou_type]["AR100"] == 0.0
        names = set(report["per_class"][iou_type])
        assert names and all(v == 0.0 for v in report["per_class"][iou_type].values())
        assert len(names) < 80  # only the classes the 6 images have


def test_repairs_ground_truth_that_pycocotools_would_misread(tmp_path):
    """Annotation id 0 (pycocotools records a match as the matched id, so 0 reads as no match),
    repeated ids, and missing iscrowd/area fields, as annotation tools export them."""
    gt_path = require(FRUITS_NUTS)
    gt = json.loads(gt_path.read_text())
    results = noisy_predictions(gt_path, seed=13)
    broken = copy.deepcopy(gt)
    broken["annotations"][0]["id"] = 0
    broken["annotations"][2]["id"] = broken["annotations"][1]["id"]
    for ann in broken["annotations"][:10]:
        del ann["iscrowd"]
    broken["annotations"][3]["segmentation"] = []  # pycocotools fails on it
    del broken["annotations"][4]["area"]
    evaluation = run_evaluation_files(write_json(tmp_path / "gt.json", broken), results)
    assert any("renumbered" in w for w in evaluation.warnings)
    assert any("10 annotations have no iscrowd" in w for w in evaluation.warnings)
    assert any("1 annotations have empty or degenerate polygons" in w for w in evaluation.warnings)
    assert any("1 annotations have no area; taken from the mask" in w for w in evaluation.warnings)
    repaired = copy.deepcopy(broken)
    for number, ann in enumerate(repaired["annotations"], start=1):
        ann["id"] = number
        ann.setdefault("iscrowd", 0)
    image = next(i for i in gt["images"] if i["id"] == repaired["annotations"][3]["image_id"])
    empty = mask_utils.encode(np.zeros((image["height"], image["width"], 1), np.uint8, order="F"))[0]
    repaired["annotations"][3]["segmentation"] = empty
    fourth = repaired["annotations"][4]
    fourth["area"] = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(
        fourth["segmentation"], *next((i["height"], i["width"]) for i in gt["images"] if i["id"] == fourth["image_id"])))))
    assert abs(fourth["area"] - gt["annotations"][4]["area"]) < 0.1 * gt["annotations"][4]["area"]
    assert_same_as_by_hand(evaluation.report, repaired, results)
    # ...which differs from what pycocotools makes of the file as it is: the repair matters.
    as_is = [dict(a, iscrowd=a.get("iscrowd", 0), area=a.get("area", 0.0)) for a in broken["annotations"]]
    assert by_hand(broken | {"annotations": as_is}, results, "bbox")[0] != [evaluation.report["bbox"][n] for n in STAT_NAMES]


def test_categories_numbered_differently_are_paired_by_name(tmp_path):
    gt_path = require(FRUITS_NUTS)
    gt = json.loads(gt_path.read_text())
    results = noisy_predictions(gt_path, seed=17)
    shift = {c["id"]: c["id"] + 10 for c in gt["categories"]}
    predictions = {"images": gt["images"], "categories": [{"id": shift[c["id"]], "name": c["name"]} for c in gt["categories"]],
                   "annotations": [{**r, "category_id": shift[r["category_id"]]} for r in results]}
    evaluation = run_evaluation_files(gt_path, write_json(tmp_path / "p.json", predictions))
    assert any("paired by name" in w for w in evaluation.warnings)
    assert_same_as_by_hand(evaluation.report, gt_path, results)


# --------------------------------------------------------------------------------------------
# The command


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        app(list(args), prog_name="segcli")
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_cli_prints_tables_and_writes_report_and_plots(tmp_path):
    gt_path = require(COCO_TINY_VAL)
    results = noisy_predictions(gt_path, seed=19)
    pred = write_json(tmp_path / "results.json", results)
    report_path, plots = tmp_path / "out" / "report.json", tmp_path / "plots"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "segcli", "eval", "--gt", str(gt_path), "--pred", str(pred),
                             "--report", str(report_path), "--plots", str(plots)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report == evaluate_files(gt_path, pred)
    assert_same_as_by_hand(report, gt_path, results)
    # stdout: the two tables, plain text in a pipe; nothing of pycocotools' progress.
    lines = result.stdout.splitlines()
    assert "\x1b" not in result.stdout and "index created" not in result.stdout and "DONE" not in result.stdout
    assert lines[0].split() == ["metric", "segm", "bbox", "IoU", "area", "max", "dets"]
    for name, line in zip(STAT_NAMES, lines[1:13]):
        shown = [f"{report[t][name]:.3f}" if report[t][name] >= 0 else "-" for t in ("segm", "bbox")]
        assert line.split()[:3] == [name, *shown]
    assert lines[1].split()[3:] == ["0.50:0.95", "all", "100"] and lines[7].split()[3:] == ["0.50:0.95", "all", "1"]
    assert lines[14].split() == ["class", "instances", "segm", "AP", "bbox", "AP"]
    person = next(line for line in lines if line.startswith("person "))
    assert person.split()[-2:] == [f"{report['per_class']['segm']['person']:.3f}",
                                   f"{report['per_class']['bbox']['person']:.3f}"]
    assert "wrote" in result.stderr
    for iou_type in ("segm", "bbox"):
        with Image.open(plots / f"pr_{iou_type}.png") as image:
            image.load()
            assert image.format == "PNG" and image.size == (800, 600)
            colours = {colour for _, colour in image.convert("RGB").getcolors(800 * 600)}
            assert all(tuple(c) in colours for c in COLOURS)  # three curves drawn
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # atomic writes leave no temporary files


def test_report_dash_writes_json_on_stdout(tmp_path, capsys):
    gt_path = require(FRUITS_NUTS)
    pred = write_json(tmp_path / "results.json", noisy_predictions(gt_path, seed=23))
    code, out, err = run_cli(capsys, "eval", "--gt", str(gt_path), "--pred", str(pred), "--report", "-", "--iou-type", "bbox")
    assert code == 0, err
    assert json.loads(out) == evaluate_files(gt_path, pred, iou_types=("bbox",))
    assert "AR100" in err  # the tables went to stderr


def test_pr_curves_are_pycocotools_precision_averaged_over_classes(tmp_path):
    gt_path = require(FRUITS_NUTS)
    results = noisy_predictions(gt_path, seed=29)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    curves = list(pr_curves(evaluator).items())
    assert [label.split()[0] for label, _ in curves] == ["IoU=0.50", "IoU=0.75", "IoU=0.50:0.95"]
    precision = evaluator.eval["precision"]  # every fruits_nuts class has ground truth: no -1 entries
    assert (precision[:, :, :, 0, -1] > -1).all()
    assert np.allclose(curves[0][1][1], precision[0, :, :, 0, -1].mean(axis=1))
    assert np.allclose(curves[1][1][1], precision[5, :, :, 0, -1].mean(axis=1))
    assert np.allclose(curves[2][1][1], precision[:, :, :, 0, -1].mean(axis=(0, 2)))
    assert curves[0][0].endswith(f"AP {evaluator.stats[1]:.3f}") and curves[2][0].endswith(f"AP {evaluator.stats[0]:.3f}")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--gt", "no/such.json", "--pred", "{pred}"], "--gt no/such.json: no such file"),
        (["--gt", "{bad_json}", "--pred", "{pred}"], "not valid JSON"),
        (["--gt", "{pred}", "--pred", "{pred}"], "a results list, not a COCO dataset"),
        (["--gt", "{gt}", "--pred", "no/such.json"], "--pred no/such.json: no such file"),
        (["--gt", "{gt}", "--pred", "{other_images}"], "no image in the predictions is in the ground truth"),
        (["--gt", "{gt}", "--pred", "{pred}", "--iou-type", "keypoints"], "--iou-type 'keypoints'"),
        (["--gt", "{gt}"], "give either --pred FILE"),
        (["--gt", "{gt}", "--pred", "{pred}", "--images", "{tmp}"], "give either --pred FILE"),
        (["--gt", "{gt}", "--pred", "{pred}", "--weights", "coco"], "--weights goes with --images"),
        (["--gt", "{gt}", "--pred", "{no_score}"], "has no numeric score"),
        (["--gt", "{gt}", "--pred", "{pred}", "--report", "{tmp}"], "is a folder"),
        (["--gt", "{gt}", "--pred", "{pred}", "--plots", "{pred}"], "is a file"),
        (["--gt", "{gt}", "--pred", "{pred}", "--report", "{pred}/r.json", "-q"], "is a file, not a folder"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, words, tmp_path, capsys):
    gt_path = require(FRUITS_NUTS)
    results = noisy_predictions(gt_path, seed=23)[:20]
    paths = {
        "gt": str(gt_path), "tmp": str(tmp_path),
        "pred": str(write_json(tmp_path / "pred.json", results)),
        "bad_json": str(write_text(tmp_path / "bad.json", '{"images": [')),
        "other_images": str(write_json(tmp_path / "other.json", {
            "images": [{"id": 1, "file_name": "elsewhere.jpg", "width": 10, "height": 10},
                       {"id": 9999, "file_name": "nowhere.jpg", "width": 10, "height": 10}],
            "annotations": [{**results[0], "image_id": 9999}]})),
        "no_score": str(write_json(tmp_path / "no_score.json", [{k: v for k, v in results[0].items() if k != "score"}])),
    }
    code, out, err = run_cli(capsys, "eval", *[a.format(**paths) for a in args])
    assert code == 2, err
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("segcli: error: ") and words in err, err


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Predict, then score


ARCH = "maskrcnn_resnet18_fpn_small"


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    from segcli.categories import coco_categories, coco_label_to_category_id
    from segcli.model.build import build_model
    from segcli.weights import save_checkpoint

    torch.manual_seed(0)
    state = build_model(ARCH, 91).state_dict()
    state["roi_heads.box_predictor.cls_score.weight"] *= 3.0  # random weights that do detect things
    path = tmp_path_factory.mktemp("weights") / "small.pt"
    save_checkpoint(path, state, ARCH, coco_categories(), coco_label_to_category_id(), {"seed": 0})
    return path


def tiny_dataset(folder: Path, scale: float = 0.25) -> Path:
    """Two coco_tiny photos shrunk by `scale`, with their (non-crowd) annotations scaled to match."""
    gt = json.loads(require(COCO_TINY_VAL).read_text())
    chosen = sorted(gt["images"], key=lambda image: image["file_name"])[:2]
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    images = []
    for image in chosen:
        width, height = round(image["width"] * scale), round(image["height"] * scale)
        with Image.open(COCO_TINY_VAL.parents[1] / "images" / "val2017" / image["file_name"]) as photo:
            photo.convert("RGB").resize((width, height), Image.BILINEAR).save(images_dir / image["file_name"])
        images.append({**image, "width": width, "height": height})
    ids = {image["id"] for image in images}
    annotations = [{**ann, "bbox": [v * scale for v in ann["bbox"]], "area": ann["area"] * scale * scale,
                    "segmentation": [[v * scale for v in polygon] for polygon in ann["segmentation"]]}
                   for ann in gt["annotations"] if ann["image_id"] in ids and not ann["iscrowd"]]
    return write_json(folder / "gt.json", {"images": images, "categories": gt["categories"], "annotations": annotations})


def test_images_and_weights_predict_then_score(small_checkpoint, tmp_path):
    gt_path = tiny_dataset(tmp_path)
    saved, report_path = tmp_path / "saved.json", tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "segcli", "eval", "--gt", str(gt_path), "--images",
                             str(tmp_path / "images"), "--weights", str(small_checkpoint), "--device", "cpu",
                             "--save-pred", str(saved), "--report", str(report_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    predictions = json.loads(saved.read_text())
    assert predictions["info"]["score_thr"] == 0.05 and predictions["info"]["max_det"] == 100
    assert sorted(image["file_name"] for image in predictions["images"]) == sorted(
        p.name for p in (tmp_path / "images").iterdir())
    scores = [ann["score"] for ann in predictions["annotations"]]
    assert scores and min(scores) > 0.05
    per_image = np.bincount([ann["image_id"] for ann in predictions["annotations"]])
    assert per_image.max() <= 100
    # The report is pycocotools' verdict on the saved predictions, paired by file name by hand.
    gt = json.loads(gt_path.read_text())
    gt_id = {image["file_name"]: image["id"] for image in gt["images"]}
    pred_to_gt = {image["id"]: gt_id[image["file_name"]] for image in predictions["images"]}
    expected = [{**{k: a[k] for k in ("category_id", "bbox", "score", "segmentation")}, "image_id": pred_to_gt[a["image_id"]]}
                for a in predictions["annotations"]]
    report = json.loads(report_path.read_text())
    for iou_type in ("segm", "bbox"):
        stats, per_class = by_hand(gt_path, expected, iou_type)
        assert [report[iou_type][n] for n in STAT_NAMES] == stats
        assert report["per_class"][iou_type] == per_class
    assert result.stdout.splitlines()[1].split()[:3] == ["AP", *(f"{report[t]['AP']:.3f}" for t in ("segm", "bbox"))]


def test_in_memory_results_may_hold_numpy_values():
    """A trainer builds results from arrays: numpy ids, scores and boxes, bytes RLE counts."""
    gt_path = require(FRUITS_NUTS)
    results = noisy_predictions(gt_path, seed=37, polygon_share=0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    as_numpy = [{"image_id": np.int64(r["image_id"]), "category_id": np.int32(r["category_id"]),
                 "score": np.float64(r["score"]), "bbox": np.array(r["bbox"]),
                 "segmentation": {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}}
                for r in results]
    assert evaluate_coco(gt, as_numpy) == evaluate_files(gt_path, results)


def test_ground_truth_without_masks_scores_boxes_only(tmp_path):
    gt_path = require(FRUITS_NUTS)
    gt = json.loads(gt_path.read_text())
    for ann in gt["annotations"]:
        del ann["segmentation"]
    boxes_only = write_json(tmp_path / "boxes_gt.json", gt)
    results = noisy_predictions(gt_path, seed=41)
    evaluation = run_evaluation_files(boxes_only, results)
    assert "segm" in evaluation.skipped and "ground-truth annotations have no mask" in evaluation.skipped["segm"]
    assert_same_as_by_hand(evaluation.report, boxes_only, results, iou_types=("bbox",))


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_per_image_work_in_forked_processes_gives_identical_numbers(iou_type):
    """The chunked evaluation hands pycocotools' accumulate() the same records in the same order."""
    from segcli.evaluate.parallel import run_cocoeval

    gt_path = require(COCO_TINY_TRAIN)
    results = noisy_predictions(gt_path, seed=43)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        detections = gt.loadRes(copy.deepcopy(results))
        alone = run_cocoeval(gt, detections, iou_type, workers=1)
        split = run_cocoeval(gt, detections, iou_type, workers=3)  # 32 images: chunks of 11, 11, 10
    assert list(split.stats) == list(alone.stats)
    for key in ("precision", "recall", "scores"):
        assert np.array_equal(split.eval[key], alone.eval[key]), key
    assert len(split.evalImgs) == len(alone.evalImgs)
    assert [r is None for r in split.evalImgs] == [r is None for r in alone.evalImgs]
    assert evaluate_files(gt_path, results, workers=2) == evaluate_files(gt_path, results, workers=1)


def test_images_without_matching_names_are_paired_by_id_and_sizes_are_checked(tmp_path):
    gt_path = require(FRUITS_NUTS)
    gt = json.loads(gt_path.read_text())
    results = noisy_predictions(gt_path, seed=47)
    renamed = [{**image, "file_name": f"renamed_{image['id']}.png"} for image in gt["images"]]
    other = renamed[0]
    renamed[0] = {**other, "width": other["width"] // 2}  # another image, whatever its id says
    predictions = {"images": renamed, "categories": gt["categories"], "annotations": results}
    evaluation = run_evaluation_files(gt_path, write_json(tmp_path / "p.json", predictions))
    assert any("no file_name matches the ground truth; images are paired by id" in w for w in evaluation.warnings)
    assert any(f"renamed_{other['id']}.png ({other['width'] // 2}x{other['height']}" in w for w in evaluation.warnings)
    kept = [r for r in results if r["image_id"] != other["id"]]
    assert_same_as_by_hand(evaluation.report, gt_path, kept)


def test_json_lines_records_of_segcli_predict(tmp_path, capsys, monkeypatch):
    """`segcli predict photos > preds.jsonl`: one record per image, paired by file name."""
    gt_path = require(FRUITS_NUTS)
    gt = json.loads(gt_path.read_text())
    results = noisy_predictions(gt_path, seed=53, polygon_share=0.0)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    lines = []
    for image in reversed(gt["images"]):
        instances = [{"category_id": r["category_id"], "category_name": names[r["category_id"]], "score": r["score"],
                      "bbox": r["bbox"], "area": 1, "segmentation": r["segmentation"]}
                     for r in results if r["image_id"] == image["id"]]
        lines.append({"file": f"photos/{image['file_name']}", "frame": None, "timestamp": None,
                      "width": image["width"], "height": image["height"], "instances": instances})
    lines.append({"file": "clip.mp4", "frame": 3, "timestamp": 0.1, "width": 800, "height": 600,
                  "instances": [dict(lines[0]["instances"][0])]})
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    evaluation = run_evaluation_files(gt_path, path)
    assert any("clip.mp4#3" in w for w in evaluation.warnings)
    assert_same_as_by_hand(evaluation.report, gt_path, results)
    same_as_json = tmp_path / "preds.json"  # the extension is not what decides
    same_as_json.write_text(path.read_text())
    assert evaluate_files(gt_path, same_as_json) == evaluation.report
    # `segcli predict photos | segcli eval --gt gt.json --pred -`
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(path.read_bytes())))
    code, out, err = run_cli(capsys, "eval", "--gt", str(gt_path), "--pred", "-", "--report", "-", "-q")
    assert code == 0, err
    assert json.loads(out) == evaluation.report
