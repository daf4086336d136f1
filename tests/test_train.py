"""`segcli train`: the recipe's pieces against torchvision, real datasets, resume after a kill,
fine-tuning on other classes, two processes under torchrun (gloo), and the user's mistakes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import roi_align
from typer.testing import CliRunner

from segcli.cli import app
from segcli.train.run import TrainOptions, lr_factor, run_train
from segcli.model.build import build_model
from segcli.model.training import (
    IGNORE, NEGATIVE, POSITIVE, Targets, TrainingModel, box_head_losses, box_iou_batched, match, sample_balanced,
)
from segcli.ops.roi_align import RoIPyramid
from tests.conftest import ROOT, SHARED_DATA, require, synthetic_shapes

TINY = "maskrcnn_resnet18_fpn_tiny"
FRUITS = SHARED_DATA / "fruits_nuts"
COCO_TINY = SHARED_DATA / "coco_tiny"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """8 synthetic 96 px images: a training set small enough for seconds per epoch."""
    return synthetic_shapes().generate(tmp_path_factory.mktemp("shapes"), images=8, size=96, seed=3)


def _random_boxes(generator, count, size=100.0):
    xy = torch.rand(count, 2, generator=generator) * size
    wh = torch.rand(count, 2, generator=generator) * size / 2 + 2
    return torch.cat([xy, xy + wh], 1)


def test_match_equals_torchvision_matcher():
    generator = torch.Generator().manual_seed(0)
    anchors = _random_boxes(generator, 400)
    gt = _random_boxes(generator, 6)
    iou = box_iou_batched(anchors[None], gt[None])[0]
    assert (iou.max(0).values > 0).all()  # every box overlaps some anchor (the case both rules agree on)
    reference = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou.T)
    state, best = match(iou[None], torch.ones(1, 6, dtype=torch.bool), 0.7, 0.3, low_quality=True)
    expected_state = torch.where(reference >= 0, POSITIVE, torch.where(reference == -1, NEGATIVE, IGNORE))
    torch.testing.assert_close(state[0], expected_state)
    torch.testing.assert_close(best[0][reference >= 0], reference[reference >= 0])
    # Padding columns never match.
    padded = torch.cat([gt, torch.zeros(2, 4)])[None]
    valid = torch.tensor([[True] * 6 + [False] * 2])
    state_padded, _ = match(box_iou_batched(anchors[None], padded), valid, 0.7, 0.3, low_quality=True)
    torch.testing.assert_close(state_padded, state)


def test_balanced_sampling_counts_and_randomness():
    torch.manual_seed(0)
    state = torch.randint(-1, 2, (3, 1000))
    state[2, :] = NEGATIVE
    state[2, :5] = POSITIVE  # few positives: negatives fill the batch
    positive, negative = sample_balanced(state, 256, 0.25)
    assert (positive <= (state == POSITIVE)).all() and (negative <= (state == NEGATIVE)).all()
    assert positive.sum(1).tolist() == [64, 64, 5]
    assert negative.sum(1).tolist() == [192, 192, 251]
    again, _ = sample_balanced(state, 256, 0.25)
    assert not torch.equal(again, positive)  # a fresh random subset each call


def test_box_head_losses_equal_torchvision():
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 1, 2, 0, 0, 0, 0, 0])
    logits = torch.randn(8, 4, generator=generator)
    deltas = torch.randn(8, 16, generator=generator)
    targets = torch.randn(3, 4, generator=generator)
    full_targets = torch.cat([targets, torch.zeros(5, 4)])
    expected = fastrcnn_loss(logits, deltas, [labels], [full_targets])
    actual = box_head_losses(logits, deltas, labels, targets)
    torch.testing.assert_close(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1])


def test_mask_loss_equals_a_per_roi_reference():
    """Each RoI's 28x28 target is its matched instance's full-resolution mask cut with aligned
    RoIAlign at the RoI's original-image coordinates and thresholded at 0.5 (Detectron2's rule);
    the loss is the mean BCE of the RoI's own-class logits against it."""
    torch.manual_seed(0)
    training = TrainingModel(build_model(TINY, 4))
    heads = training.model.roi_heads
    generator = torch.Generator().manual_seed(2)
    masks = (torch.rand(2, 3, 60, 80, generator=generator) > 0.5).to(torch.uint8)
    masks[:, :, 10:40, 20:60] = 1  # some structure, so targets are neither all 0 nor all 1
    targets = Targets(boxes=torch.zeros(2, 3, 4), labels=torch.ones(2, 3, dtype=torch.long), masks=masks)
    scale = torch.tensor([[2.0, 2.0], [1.5, 2.5]])  # (y, x) resize factor per image
    rois = _random_boxes(generator, 7, size=100.0)
    image = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    matched = torch.tensor([2, 0, 0, 1, 2, 2, 1])  # row 0 of image 0 is never used
    labels = torch.tensor([1, 3, 2, 1, 3, 2, 1])
    features = [torch.randn(2, 64, 32 // 2**level, 48 // 2**level, generator=generator) for level in range(4)]
    pyramid = RoIPyramid(features, (128, 192))
    loss = training.mask_loss(pyramid, rois, image, labels, matched, targets, scale)

    expected = []
    for i in range(len(rois)):
        box = rois[i] / scale[image[i]][[1, 0, 1, 0]]
        mask = masks[image[i], matched[i]][None, None].float()
        target = roi_align(mask, [box[None]], (28, 28), 1.0, 2, aligned=True)[0, 0] >= 0.5
        logits = heads.mask_predictor(heads.mask_head(pyramid(rois[i:i + 1], image[i:i + 1], 14, 2)))[0, labels[i]]
        expected.append(torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float()))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


def test_learning_rate_schedule():
    assert lr_factor(0, 100, 10, "step") == pytest.approx(0.001)
    assert lr_factor(10, 100, 10, "step") == 1.0
    assert lr_factor(67, 100, 10, "step") == pytest.approx(0.1)
    assert lr_factor(89, 100, 10, "step") == pytest.approx(0.01)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)


def _options(coco: Path, out: Path, **overrides) -> TrainOptions:
    base = dict(coco=str(coco), arch=TINY, epochs=1, batch_size=2, min_sizes=[96], max_size=160, workers=0,
                out=str(out), device="cpu", quiet=True, log_every=1, lr=0.02)
    base.update(overrides)
    return TrainOptions(**base)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fruits_nuts_trains_loss_falls_and_checkpoint_predicts(tmp_path):
    annotations = require(FRUITS / "annotations.json")
    data = json.loads(annotations.read_text())
    keep = {i["id"] for i in data["images"][:2]}  # two photos, seen again and again
    data["images"] = [i for i in data["images"] if i["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    subset = tmp_path / "fruits.json"
    subset.write_text(json.dumps(data))
    run = tmp_path / "run"
    summary = run_train(_options(subset, run, images=str(FRUITS / "images"), epochs=12, min_sizes=[128],
                                 max_size=192, warmup_iters=2, lr=0.01))
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert summary.best is None and summary.last.is_file()  # no validation set: no best.pt
    out = tmp_path / "pred.json"
    result = CliRunner().invoke(app, ["predict", str(FRUITS / "images" / data["images"][0]["file_name"]),
                                      "--weights", str(summary.last), "--score-thr", "0.0", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    predicted = json.loads(out.read_text())
    assert [(c["id"], c["name"]) for c in predicted["categories"]] == [(c["id"], c["name"]) for c in data["categories"]]
    assert predicted["annotations"] and {a["category_id"] for a in predicted["annotations"]} <= {1, 2, 3}


def test_coco_tiny_trains_with_validation_and_writes_best(tmp_path):
    def subset(split: str, count: int) -> Path:
        data = json.loads(require(COCO_TINY / "annotations" / f"instances_{split}.json").read_text())
        keep = {i["id"] for i in data["images"][:count]}
        data["images"] = [i for i in data["images"] if i["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        path = tmp_path / f"{split}.json"
        path.write_text(json.dumps(data))
        return path

    run = tmp_path / "run"
    summary = run_train(_options(subset("train2017", 2), run, images=str(COCO_TINY / "images" / "train2017"),
                                 val_coco=str(subset("val2017", 1)), val_images=str(COCO_TINY / "images" / "val2017"),
                                 epochs=1, min_sizes=[96]))
    record = _metrics(run)[-1]
    assert record["epoch"] == 1 and "val_segm_AP" in record and "val_bbox_AP" in record
    assert summary.best == run / "best.pt" and summary.best.is_file()
    checkpoint = torch.load(summary.best, weights_only=True)
    assert checkpoint["arch"] == TINY and len(checkpoint["label_to_category_id"]) == 81
    assert checkpoint["meta"]["input_size"] == {"min_size": 96, "max_size": 160}


def _train_command(coco: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "segcli", "train", "--coco", str(coco), "--arch", TINY, "--epochs", str(epochs),
            "--batch-size", "2", "--min-size", "96", "--max-size", "160", "--workers", "0", "--device", "cpu",
            "--lr", "0.02", "--seed", "5", "--out", str(out), *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_killed_run_resumes_to_the_same_weights(shapes, tmp_path):
    epochs = 4
    straight = tmp_path / "straight"
    subprocess.run(_train_command(shapes, straight, epochs, "-q"), check=True, env=_env(), timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(shapes, killed, epochs, "-q"), env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and '"seconds"' in metrics.read_text():  # epoch 1 saved
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = torch.load(killed / "last.pt", weights_only=True)["training"]["epoch"] + 1
    assert interrupted_at < epochs, "the run finished before it could be killed"

    subprocess.run(_train_command(shapes, killed, epochs, "-q", "--resume"), check=True, env=_env(), timeout=600)
    expected, actual = _state(straight / "last.pt"), _state(killed / "last.pt")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert [m["epoch"] for m in _metrics(killed) if "seconds" in m] == list(range(1, epochs + 1))


def test_finetune_on_other_classes_reinitializes_class_layers(shapes, tmp_path):
    first = run_train(_options(shapes, tmp_path / "shapes_run"))
    annotations = require(FRUITS / "annotations.json")
    data = json.loads(annotations.read_text())
    data["images"] = data["images"][:1]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]]
    fruits = tmp_path / "fruits.json"
    fruits.write_text(json.dumps(data))
    tuned = run_train(_options(fruits, tmp_path / "tuned", images=str(FRUITS / "images"), weights=str(first.last),
                               arch=None, lr=1e-12))
    before, after = _state(first.last), _state(tuned.last)
    assert after["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4  # 3 fruits + background
    # A vanishing lr with BatchNorm frozen (the fine-tuning default): shared layers are exactly the initial ones.
    torch.testing.assert_close(after["backbone.body.layer1.0.conv1.weight"], before["backbone.body.layer1.0.conv1.weight"])
    torch.testing.assert_close(after["backbone.body.bn1.running_mean"], before["backbone.body.bn1.running_mean"])
    checkpoint = torch.load(tuned.last, weights_only=True)
    assert [c["name"] for c in checkpoint["categories"]] == [c["name"] for c in data["categories"]]
    assert "re-initialized" in checkpoint["meta"]["init"]


def test_torchrun_two_processes_with_gloo(shapes, tmp_path):
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "segcli",
               *_train_command(shapes, run, 1)[3:], "--log-every", "1"]
    result = subprocess.run(command, env=dict(_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    # Rank 0 reports for both, and no rank aborts in its teardown (Gloo's threads, when the process
    # group is left to the interpreter's exit: SIGABRT after the work is done, now and then).
    assert result.stderr.count("segcli: trained 2 iterations") == 1, result.stderr[-3000:]
    assert "terminate called" not in result.stderr, result.stderr[-3000:]
    assert (run / "last.pt").is_file()
    # 8 images, 2 ranks x batch 2: 2 iterations, logged once each by rank 0 alone, plus the epoch line.
    assert [m["iteration"] for m in _metrics(run)] == [1, 2, 2]


@pytest.mark.parametrize("args, message", [
    (["--coco", "missing.json"], "COCO file not found: missing.json"),
    (["--coco", "{shapes}", "--optimizer", "rmsprop"], "--optimizer 'rmsprop'"),
    (["--coco", "{shapes}", "--min-size", "a,b"], "--min-size 'a,b'"),
    (["--coco", "{shapes}", "--arch", "resnet9000"], "unknown --arch"),
    (["--coco", "{shapes}", "--out", "{existing}"], "already holds a run"),
])
def test_user_mistakes_are_one_line_exit_2(shapes, tmp_path, args, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "last.pt").write_bytes(b"")
    args = [a.format(shapes=shapes, existing=existing) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new")]
    result = CliRunner().invoke(app, ["train", *args, "--device", "cpu", "-q"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.strip().count("\n") == 0


@pytest.mark.parametrize("live", [True, False])
def test_train_display_live_bar_on_a_terminal_plain_lines_in_logs(live):
    import io

    from segcli.train.log import TrainDisplay

    stream = io.StringIO()
    line = {"epoch": 1, "loss": 1.25, "mask": 0.5, "lr": 0.01, "images_per_s": 3.5}
    with TrainDisplay(total=10, start=0, enabled=True, live=live, log_every=5, stream=stream) as display:
        for iteration in range(1, 11):
            if display.wants(iteration):
                display.update(iteration, line)
        display.epoch_done({"epoch": 1, "seconds": 12.0, "train_loss": 1.0, "val_segm_AP": 0.5, "val_bbox_AP": 0.25})
    text = stream.getvalue()
    assert "epoch 1 done in 12 s, loss 1.000, val mask AP 0.500 box AP 0.250" in text
    if live:
        assert "train" in text and "10/10" in text and "loss 1.250" in text
    else:
        assert text.count("iteration") == 2 and "iteration 10/10 loss 1.250 mask 0.500 lr 1.00e-02 3.50 img/s" in text
