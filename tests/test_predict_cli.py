"""`segcli predict` end to end: real photos in, a COCO file pycocotools loads out; bad input and
bad usage give one line and the documented exit code."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from segcli.categories import coco_categories, coco_label_to_category_id
from segcli.data.images import read_image
from segcli.predict.core import Predictor
from segcli.predict.options import PredictOptions
from segcli.predict.run import run_predict
from segcli.errors import UsageError
from segcli.model.build import build_model
from segcli.model.parity import compare_detections
from segcli.weights import save_checkpoint
from tests.conftest import COCO_TINY_VAL, require

ARCH = "maskrcnn_resnet18_fpn_small"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """Seeded small model whose classifier is scaled so that random weights yield detections."""
    torch.manual_seed(0)
    state = build_model(ARCH, 91).state_dict()
    state["roi_heads.box_predictor.cls_score.weight"] *= 3.0
    path = tmp_path_factory.mktemp("weights") / "small.pt"
    save_checkpoint(path, state, ARCH, coco_categories(), coco_label_to_category_id(), {"seed": 0})
    return path


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    return sorted(require(COCO_TINY_VAL).glob("*.jpg"))


def segcli(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "segcli", *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_folder_to_coco_file_that_pycocotools_loads(checkpoint, tmp_path):
    source = require(COCO_TINY_VAL)
    out = tmp_path / "preds.json"
    result = segcli("predict", str(source), "--weights", str(checkpoint), "--out", str(out), "--score-thr", "0.05")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # data goes to the file; stdout stays clean
    assert "6 images" in result.stderr
    coco = COCO(str(out))
    names = sorted(image["file_name"] for image in coco.dataset["images"])
    assert names == sorted(p.name for p in source.glob("*.jpg"))  # relative to the SOURCE folder
    assert {c["id"] for c in coco.dataset["categories"]} == {c["id"] for c in coco_categories()}
    anns = coco.dataset["annotations"]
    assert anns and len({a["id"] for a in anns}) == len(anns)
    for ann in anns[:50]:
        assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
        assert ann["score"] > 0.05 and ann["area"] > 0
        image = coco.imgs[ann["image_id"]]
        assert ann["segmentation"]["size"] == [image["height"], image["width"]]
        x, y, w, h = ann["bbox"]
        assert 0 <= x <= x + w <= image["width"] + 0.01 and 0 <= y <= y + h <= image["height"] + 0.01
        mask = coco.annToMask(ann)  # decodes
        assert mask.shape == (image["height"], image["width"])
    per_image = {}
    for ann in anns:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert max(per_image.values()) <= 100


def test_results_format_loads_with_loadres(checkpoint, tmp_path, photos):
    out = tmp_path / "results.json"
    result = segcli("predict", *map(str, photos[:2]), "--weights", str(checkpoint), "--out", str(out),
                    "--format", "coco-results", "--score-thr", "0.05", "--max-det", "7")
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert isinstance(results, list) and results
    assert {r["image_id"] for r in results} <= {1, 2}
    ground_truth = COCO()
    ground_truth.dataset = {"images": [{"id": 1, "height": 480, "width": 640}, {"id": 2, "height": 480, "width": 640}],
                            "annotations": [], "categories": coco_categories()}
    ground_truth.createIndex()
    ground_truth.loadRes(str(out))
    counts = np.bincount([r["image_id"] for r in results])
    assert counts.max() <= 7


def test_bad_inputs_are_skipped_with_one_line_each_and_exit_code_1(checkpoint, tmp_path, photos):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(photos[0], folder / "good.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a picture")
    (folder / "truncated.jpg").write_bytes(photos[1].read_bytes()[:2000])
    out = tmp_path / "out.json"
    result = segcli("predict", str(folder), "--weights", str(checkpoint), "--out", str(out))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3
    for name in ("empty.jpg", "text.jpg", "truncated.jpg"):
        assert sum(name in line for line in warnings) == 1
    assert "3 inputs failed" in result.stderr
    assert [image["file_name"] for image in json.loads(out.read_text())["images"]] == ["good.jpg"]


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["predict", "no/such/folder"], 2, "does not exist"),
        (["predict", "{photo}", "--weights", "no_such_weights.pt"], 3, "--weights"),
        (["predict", "{photo}", "--weights", "{checkpoint}", "--device", "tpu"], 2, "--device"),
        (["predict", "{photo}", "--weights", "{checkpoint}", "--score-thr", "2"], 2, "--score-thr"),
        (["predict", "{photo}", "--weights", "{checkpoint}", "--format", "xml"], 2, "--format"),
        (["predict", "{photo}", "--no-such-flag"], 2, "no-such-flag"),
        (["predict", "{photo}", "--weights", "{checkpoint}", "--format", "yolo", "--out", "{tmp}/y.json"], 2, "folder"),
        (["predict", "{photo}", "--weights", "{checkpoint}", "--out", "{tmp}/p.csv"], 2, "cannot tell the output format"),
        (["predict", "{photo}", "--weights", "{checkpoint}", "--classes", "unicorn"], 2, "--classes"),
        (["predict", "{photo}", "--weights", "{checkpoint}", "--vid-stride", "0"], 2, "--vid-stride"),
        (["predict", "{photo}", "--weights", "{checkpoint}", "--streams", "0"], 2, "--streams"),
        (["predict", "{photo}", "--weights", "{checkpoint}", "--streams", "17"], 2, "--streams"),
    ],
)
def test_usage_and_weights_errors_are_one_line(args, code, words, checkpoint, photos, tmp_path):
    out = tmp_path / "keep.json"
    out.write_text("previous")
    args = [a.format(photo=photos[0], checkpoint=checkpoint, tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    result = segcli(*args)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert words in result.stderr
    assert out.read_text() == "previous"  # a failed run leaves the old output alone
    if code != 2 or "no-such-flag" not in words:
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_paths_on_stdin_and_json_lines_on_stdout(checkpoint, photos):
    listing = "\n".join(str(p) for p in photos[:2]) + "\n"
    result = segcli("predict", "-", "--weights", str(checkpoint), "--quiet", "--score-thr", "0.05", stdin=listing)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # JSON Lines: the stdout default
    assert [line["file"] for line in lines] == [str(p) for p in photos[:2]]
    for line in lines:
        assert line["frame"] is None and (line["width"], line["height"]) == read_image(Path(line["file"])).shape[1::-1]
        assert line["instances"]
        for instance in line["instances"]:
            assert set(instance) == {"category_id", "category_name", "score", "bbox", "area", "segmentation"}
            assert instance["segmentation"]["size"] == [line["height"], line["width"]]
    # COCO on stdout when asked for: one complete document.
    result = segcli("predict", "-", "--weights", str(checkpoint), "--quiet", "--format", "coco", stdin=listing)
    assert [image["file_name"] for image in json.loads(result.stdout)["images"]] == [str(p) for p in photos[:2]]


def test_batches_of_mixed_sizes_give_the_same_detections_as_one_by_one(checkpoint, photos):
    # 640x480, 640x427 and 500x375 photos, plus a 640x478 crop that shares the 640x480 photo's
    # padded input size and so goes through the batched mixed-size resize with it.
    chosen = [p for p in photos if p.name in {"000000444010.jpg", "000000565004.jpg", "000000547503.jpg"}]
    predictor = Predictor.load(str(checkpoint), None, "cpu", "fp32", 0.05, 100, progress=False)
    from segcli.data.decode import Decoded, decode_item
    from segcli.data.sources import InputItem

    decoded = [decode_item(InputItem(p, p.name), i) for i, p in enumerate(chosen)]
    crop = np.ascontiguousarray(decoded[0].image[:478])
    decoded.append(Decoded(InputItem(chosen[0], "crop.jpg"), 3, crop, None))
    assert predictor.model.padded_input_size(480, 640) == predictor.model.padded_input_size(478, 640)
    together = predictor.predict(decoded)
    assert [r.item.file_name for r in together] == [d.item.file_name for d in decoded]  # input order kept
    for one, item in zip(together, decoded):
        alone = predictor.predict([item])[0]
        assert len(alone.scores) > 10
        report = compare_detections(*as_tensors(alone), *as_tensors(one))
        # Padding changes float sums: one detection in ~100 may cross the threshold (AVX2 CPUs).
        assert report.fraction >= 0.97, report


def as_tensors(prediction):
    from pycocotools import mask as mask_utils

    masks = mask_utils.decode(prediction.rles).transpose(2, 0, 1).astype(bool) if prediction.rles else np.zeros((0, 1, 1), bool)
    return (torch.from_numpy(prediction.boxes), torch.from_numpy(prediction.scores),
            torch.from_numpy(prediction.category_ids), torch.from_numpy(masks))


def test_score_threshold_is_applied_before_masks(checkpoint, photos):
    from segcli.data.decode import Decoded
    from segcli.data.sources import InputItem

    image = read_image(photos[0])
    decoded = [Decoded(InputItem(photos[0], photos[0].name), 0, image, None)]
    low = Predictor.load(str(checkpoint), None, "cpu", "fp32", 0.05, 100, progress=False)
    everything = low.predict(decoded)[0]
    threshold = float(np.median(everything.scores))
    high = Predictor.load(str(checkpoint), None, "cpu", "fp32", threshold, 100, progress=False)
    above = high.predict(decoded)[0]
    # The detections above the threshold are exactly those of 0.05-then-filter, masks included.
    keep = everything.scores > threshold
    assert 0 < keep.sum() < len(keep)
    assert np.array_equal(everything.category_ids[keep], above.category_ids)
    assert np.allclose(everything.boxes[keep], above.boxes)
    assert [r["counts"] for r, k in zip(everything.rles, keep) if k] == [r["counts"] for r in above.rles]
    # ...and the mask head ran only on those: the detections handed to it are the kept ones.
    detections = high.model(torch.from_numpy(image)[None], [image.shape[:2]])
    assert detections.mask_probs.shape[0] == int(keep.sum())


def test_run_predict_in_process_reports_failures(checkpoint, tmp_path, photos):
    missing = tmp_path / "list.txt"
    missing.write_text(f"{photos[0]}\n{tmp_path / 'vanished.jpg'}\n")
    stderr = io.StringIO()
    summary = run_predict(PredictOptions(sources=[str(missing)], out=str(tmp_path / "o.json"), weights=str(checkpoint),
                                         device="cpu", progress=False), stderr=stderr)
    assert summary.images == 1 and [Path(f).name for f, _ in summary.failures] == ["vanished.jpg"]
    assert "vanished.jpg" in stderr.getvalue()


def test_candidate_cap_used_on_cuda_keeps_the_same_detections(checkpoint, photos):
    """CPU twin of the CUDA path, which sizes detection NMS with a fixed candidate cap (no host sync)."""
    from segcli.model.roi_heads import DetectionSettings
    from segcli.weights import resolve_weights
    from segcli.model.build import model_from_checkpoint

    image = read_image(photos[0])
    batch = torch.from_numpy(image)[None]
    ckpt = resolve_weights(str(checkpoint))
    exact = model_from_checkpoint(ckpt, DetectionSettings(score_threshold=0.05))(batch, [image.shape[:2]])
    capped = model_from_checkpoint(ckpt, DetectionSettings(score_threshold=0.05, candidate_cap=4096))(batch, [image.shape[:2]])
    assert torch.equal(exact.boxes, capped.boxes) and torch.equal(exact.labels, capped.labels)
    tight = model_from_checkpoint(ckpt, DetectionSettings(score_threshold=0.05, candidate_cap=10))(batch, [image.shape[:2]])
    assert len(tight.boxes) <= 10 and torch.equal(tight.scores, exact.scores[: len(tight.scores)])


VIDEO = COCO_TINY_VAL.parents[2] / "videos" / "arjun234_vtest.avi"


def test_json_lines_stream_out_while_the_run_goes_on_and_sigterm_stops_cleanly(checkpoint):
    video = require(VIDEO)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "segcli", "predict", str(video), "--weights", str(checkpoint),
                                "--vid-stride", "20", "--max-det", "2", "-q"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    first = json.loads(process.stdout.readline())
    assert process.poll() is None  # the first line arrived while the video was still being read
    assert first["frame"] == 0 and first["timestamp"] == 0.0 and first["file"] == str(video)
    process.send_signal(15)  # SIGTERM, as cron or a container stop sends
    rest, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and b"Traceback" not in stderr
    frames = [json.loads(line)["frame"] for line in rest.splitlines()]  # whole lines only
    assert frames == list(range(20, 20 * (len(frames) + 1), 20))


@pytest.mark.skipif(shutil.which("jq") is None or shutil.which("sh") is None, reason="needs jq and sh")
def test_find_pipe_predict_pipe_jq(checkpoint, photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:2]:
        shutil.copy(photo, folder / photo.name)
    command = (f"find {folder} -name '*.jpg' | sort | {sys.executable} -m segcli predict - --weights {checkpoint} "
               f"--max-det 3 | jq -r .file; echo \"predict=${{PIPESTATUS:-done}}\"")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.splitlines()[:2] == [str(folder / p.name) for p in photos[:2]]
    assert "Traceback" not in result.stderr
    # A reader that leaves early (`| head -1`) stops segcli quietly.
    command = f"{sys.executable} -m segcli predict {require(VIDEO)} --weights {checkpoint} --vid-stride 40 | head -c 10"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout == '{"file":"/'[:10] or result.stdout.startswith('{"file"')
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_classes_keep_exactly_those_detections(checkpoint, photos, tmp_path):
    def run(**extra):
        out = tmp_path / f"p{len(list(tmp_path.iterdir()))}.jsonl"
        run_predict(PredictOptions(sources=[str(photos[0])], out=str(out), weights=str(checkpoint), device="cpu",
                                   precision="fp32", score_thr=0.06, progress=False, quiet=True, **extra))
        return json.loads(out.read_text())["instances"]

    everything = run()
    assert 3 <= len(everything) < 100  # --max-det not binding: filtering after equals restricting before
    counts = {}
    for instance in everything:
        counts[instance["category_name"]] = instance["category_id"]
    chosen = sorted(counts.items())[:2]
    spec = [chosen[0][0].upper(), str(chosen[1][1])]  # a name (any case) and an id
    kept = run(classes=[",".join(spec)])
    assert kept == [i for i in everything if i["category_id"] in {chosen[0][1], chosen[1][1]}]
    with pytest.raises(UsageError, match="--classes: 'unicorn'"):
        run(classes=["unicorn"])
