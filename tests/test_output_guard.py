"""No subcommand writes over its own inputs or over another of its outputs (issue 15): each such
run stops before any work with exit code 2 and one line naming both paths, and leaves every
file as it was. Same file means the same path after symlinks, or the same device and inode
(hard links)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.errors import UsageError
from segcli.paths_guard import Output, refuse_overwrites
from tests.conftest import ROOT, synthetic_shapes

DEMO = "shapes_demo"


@pytest.fixture()
def data(tmp_path) -> dict[str, Path]:
    gt = synthetic_shapes().generate(tmp_path / "data", images=2, size=64, seed=5)
    truth = json.loads(gt.read_text())
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                 "score": 0.9, "segmentation": a["segmentation"]} for a in truth["annotations"]]))
    images = tmp_path / "data" / "images"
    return {"root": tmp_path, "gt": gt, "pred": pred, "images": images, "image": sorted(images.iterdir())[0]}


def refused(args: list[str], *names: Path | str, root: Path) -> str:
    """Run segcli; it must stop with exit 2 and one line naming every one of `names`, having
    changed, created or removed nothing under `root`."""
    before = {p: (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("segcli: error: "), result.stderr
    for name in names:
        assert f"'{name}'" in result.stderr, (name, result.stderr)
    assert {p: (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")} == before
    return result.stderr


def test_predict_out_onto_its_input_or_a_link_to_it_is_refused(data):
    image, root = data["image"], data["root"]
    refused(["predict", image, "--out", image, "--format", "coco", "--weights", DEMO], image, root=root)
    os.symlink(image, root / "link.json")
    refused(["predict", image, "--out", root / "link.json", "--weights", DEMO], root / "link.json", image, root=root)
    os.link(image, root / "hard.json")
    refused(["predict", image, "--out", root / "hard.json", "--weights", DEMO], root / "hard.json", image, root=root)
    listing = root / "list.txt"
    listing.write_text(f"{image}\n")
    refused(["predict", listing, "--out", listing, "--format", "coco", "--weights", DEMO], listing, root=root)
    weights = root / "model.pt"
    shutil.copy(ROOT / "weights" / "maskrcnn_resnet18_fpn_tiny_shapes.pt", weights)
    refused(["predict", image, "--weights", weights, "--out", weights, "--format", "coco"], weights, root=root)


def test_predict_per_image_files_and_overlays_never_replace_inputs(data):
    images, root = data["images"], data["root"]
    # A PNG output of an earlier run lying among the photos is an input of this one.
    earlier = images / (data["image"].stem + ".instances.png")
    shutil.copy(data["image"], earlier)
    message = refused(["predict", images, "--out", f"{images}/", "--format", "png", "--weights", DEMO], earlier, root=root)
    assert "--out" in message
    jpg = images / "photo.jpg"
    shutil.copy(ROOT / "examples" / "images" / "000000471345.jpg", jpg)
    refused(["predict", images, "--out", root / "preds.json", "--overlay", images, "--weights", DEMO], jpg, root=root)
    refused(["predict", images, "--out", root / "x.json", "--overlay", root / "x.json", "--weights", DEMO],
            root / "x.json", root=root)


def test_predict_out_under_a_file_and_bad_workers_are_one_line(data):
    image, root = data["image"], data["root"]
    refused(["predict", image, "--out", f"{image}/x.json", "--weights", DEMO], image, root=root)
    refused(["predict", image, "--workers", "-1", "--weights", DEMO], root=root)


def test_eval_outputs_never_replace_the_ground_truth_the_predictions_or_each_other(data):
    gt, pred, root = data["gt"], data["pred"], data["root"]
    refused(["eval", "--gt", gt, "--pred", pred, "--report", gt], gt, root=root)
    refused(["eval", "--gt", gt, "--pred", pred, "--report", pred], pred, root=root)
    refused(["eval", "--gt", gt, "--pred", pred, "--plots", gt], root=root)  # a file where a folder goes
    plots = root / "plots"
    plots.mkdir()
    os.symlink(gt, plots / "pr_segm.png")
    refused(["eval", "--gt", gt, "--pred", pred, "--plots", plots], plots / "pr_segm.png", gt, root=root)
    refused(["eval", "--gt", gt, "--images", data["images"], "--weights", DEMO, "--save-pred", root / "r.json",
             "--report", root / "r.json"], root / "r.json", root=root)
    refused(["eval", "--gt", gt, "--images", data["images"], "--weights", DEMO, "--save-pred", data["image"]],
            data["image"], root=root)


def test_train_refuses_its_annotations_as_run_folder_before_building_a_model(data):
    gt, root = data["gt"], data["root"]
    message = refused(["train", "--coco", gt, "--out", gt, "--arch", "maskrcnn_resnet18_fpn_tiny"], gt, root=root)
    assert "--coco" in message
    run = root / "run"
    run.mkdir()
    os.link(gt, run / "metrics.jsonl")  # the run would append to the annotations through the link
    refused(["train", "--coco", gt, "--out", run, "--arch", "maskrcnn_resnet18_fpn_tiny"], gt, root=root)


def test_export_out_onto_its_weights_or_a_verification_photo_is_refused(data):
    root = data["root"]
    weights = root / "model.pt"
    shutil.copy(ROOT / "weights" / "maskrcnn_resnet18_fpn_tiny_shapes.pt", weights)
    refused(["export", "--weights", weights, "--format", "torchscript", "--out", weights], weights, root=root)
    refused(["export", "--weights", weights, "--format", "torchscript", "--out", data["image"],
             "--images", data["image"]], data["image"], root=root)


def test_guard_rules(tmp_path):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"photo")
    inputs = [("the input", photo)]
    with pytest.raises(UsageError, match="would overwrite the input"):
        refuse_overwrites(inputs, [Output("--out", tmp_path / "sub" / ".." / "a.jpg")])
    with pytest.raises(UsageError, match="would be the same file"):
        refuse_overwrites(inputs, [Output("--a", tmp_path / "x"), Output("--b", tmp_path / "x")])
    with pytest.raises(UsageError, match="is the input .*a file; give a folder"):
        refuse_overwrites(inputs, [Output("--out", photo, folder=True)])
    # Two outputs may share a folder (labels and overlays side by side); missing inputs cannot be lost.
    refuse_overwrites(inputs + [("the input", tmp_path / "missing.jpg")],
                      [Output("--out", tmp_path / "o", folder=True), Output("--overlay", tmp_path / "o", folder=True),
                       Output("--report", tmp_path / "missing.jpg")])
