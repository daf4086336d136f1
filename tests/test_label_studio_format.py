"""Label Studio's brush RLE and task JSON, without a server: segcli's encoder and decoder against
each other and against Label Studio's own converter (label_studio_sdk.converter.brush, run in the
label-studio venv: the same executable the loop test uses), and COCO -> tasks -> COCO."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segcli.writers.label_studio import (brush_rle_to_mask, config_categories, decode_brush_rle,
                                         labeling_config, mask_to_brush_rle,
                                         results_to_coco, tasks_from_coco)
from tests.label_studio_server import label_studio_bin as _label_studio_bin
from tests.test_label_studio_loop import REQUIRED


def _masks():
    rng = np.random.default_rng(3)
    yield np.zeros((5, 7), bool)
    yield np.ones((300, 301), bool)  # runs longer than 65536 values (301*300*4): split
    yield rng.random((40, 33)) > 0.5  # many short runs
    mask = np.zeros((64, 80), bool)
    mask[10:50, 5:70] = True
    yield mask


@pytest.mark.parametrize("mask", list(_masks()), ids=["empty", "full", "noise", "box"])
def test_brush_rle_round_trips(mask):
    rle = mask_to_brush_rle(mask)
    assert all(0 <= b <= 255 for b in rle)
    assert np.array_equal(brush_rle_to_mask(rle, *mask.shape), mask)


def test_brush_rle_decodes_literal_sequences():
    # A hand-made stream: 3 values as one literal block (x=0), field 0 (3 bits: count-1 = 2).
    bits = format(3, "032b") + format(7, "05b") + "".join(format(s - 1, "04b") for s in (3, 4, 8, 16))
    bits += "0" + "00" + "010" + format(9, "08b") + format(200, "08b") + format(0, "08b")
    bits += "0" * (-len(bits) % 8)
    data = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    assert decode_brush_rle(data).tolist() == [9, 200, 0]
    with pytest.raises(ValueError):
        decode_brush_rle(data[:6])


def _python_of_label_studio() -> Path | None:
    binary = _label_studio_bin()
    python = Path(binary).parent / "python" if binary else None
    if python is None or not python.exists():
        if REQUIRED:
            pytest.fail("label-studio's venv is required (SEGCLI_REQUIRE_LABEL_STUDIO=1) but not found")
        pytest.skip("label-studio is not installed (its converter is the reference)")
    return python


def test_brush_rle_matches_label_studio_converter(tmp_path):
    python = _python_of_label_studio()
    masks = [m.astype(np.uint8) for m in _masks()]
    ours = [mask_to_brush_rle(m) for m in masks]
    (tmp_path / "in.json").write_text(json.dumps({"masks": [m.tolist() for m in masks], "ours": ours}))
    script = (
        "import json, sys, numpy as np\n"
        "from label_studio_sdk.converter.brush import decode_rle, mask2rle\n"
        "d = json.load(open(sys.argv[1]))\n"
        "out = {'decoded': [np.reshape(decode_rle(r), (len(m), len(m[0]), 4))[:, :, 3].tolist() for r, m in zip(d['ours'], d['masks'])],\n"
        "       'theirs': [mask2rle((np.array(m, dtype=np.uint8) * 255)) for m in d['masks']]}\n"
        "json.dump(out, open(sys.argv[2], 'w'))\n")
    subprocess.run([str(python), "-c", script, str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                   check=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    out = json.loads((tmp_path / "out.json").read_text())
    for mask, decoded, theirs in zip(masks, out["decoded"], out["theirs"]):
        assert np.array_equal(np.array(decoded) > 127, mask > 0)  # Label Studio reads ours
        assert np.array_equal(brush_rle_to_mask(theirs, *mask.shape), mask > 0)  # we read theirs


def test_config_lists_categories_in_order():
    names = ["circle", "square", "a <b> & \"c\""]
    config = labeling_config(names)
    assert config_categories(config) == names
    assert "PolygonLabels" in config and "BrushLabels" in config


@pytest.mark.parametrize("shape", ["polygon", "brush"])
def test_coco_to_tasks_to_coco(shape):
    mask = np.zeros((48, 64), np.uint8)
    mask[8:30, 10:40] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    coco = {"images": [{"id": 7, "file_name": "a/b.png", "width": 64, "height": 48},
                       {"id": 8, "file_name": "c.png", "width": 64, "height": 48}],
            "categories": [{"id": 3, "name": "box"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "score": 0.9,
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}]}
    tasks = tasks_from_coco(coco, lambda name: "http://x/" + name, shape, "v1", keep={"a/b.png"})
    assert len(tasks) == 1 and tasks[0]["data"]["image"] == "http://x/a/b.png"
    prediction = tasks[0]["predictions"][0]
    assert prediction["model_version"] == "v1" and prediction["score"] == pytest.approx(0.9)
    [region] = prediction["result"]
    assert region["score"] == pytest.approx(0.9)
    back = results_to_coco([({"id": 1, "data": tasks[0]["data"]}, prediction["result"])], ["box"])
    [annotation] = back["annotations"]
    assert back["images"][0]["file_name"] == "a/b.png" and annotation["category_id"] == 1
    assert annotation["bbox"] == pytest.approx([10, 8, 30, 22])
    assert annotation["area"] == pytest.approx(mask.sum(), rel=0.02 if shape == "polygon" else 0)


@pytest.mark.parametrize("masks", ["rle", "polygon"])
def test_predict_format_label_studio_holds_the_runs_detections(tmp_path, masks):
    """`--format label-studio` gives the same regions, read back to COCO, as the run's COCO file:
    masks pixel for pixel (brush), polygons within the tracing's tolerance."""
    from typer.testing import CliRunner

    from segcli.cli import app
    from tests.conftest import synthetic_shapes

    synthetic_shapes().generate(tmp_path / "set", images=3, size=96, seed=4)
    images = tmp_path / "set" / "images"
    runner = CliRunner()
    for fmt, out in (("coco", "pred.json"), ("label-studio", "tasks.json")):
        result = runner.invoke(app, ["predict", str(images), "--weights", "shapes_demo", "--format", fmt,
                                     "--masks", masks, "--out", str(tmp_path / out), "-q",
                                     "--image-url-prefix", "http://images.example/"])
        assert result.exit_code == 0, result.output
    coco = json.loads((tmp_path / "pred.json").read_text())
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert [t["data"]["segcli_file"] for t in tasks] == [i["file_name"] for i in coco["images"]]
    assert all(t["data"]["image"] == "http://images.example/" + t["data"]["segcli_file"] for t in tasks)
    names = [c["name"] for c in coco["categories"]]
    back = results_to_coco([(t, t["predictions"][0]["result"]) for t in tasks], names)
    ids = {c["id"]: c["name"] for c in coco["categories"]}
    for image, pulled in zip(coco["images"], back["images"]):
        want = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        got = [a for a in back["annotations"] if a["image_id"] == pulled["id"]]
        assert want and sorted(ids[a["category_id"]] for a in want) == sorted(names[a["category_id"] - 1] for a in got)
        # Paired by class and nearest box: the two files' areas are measured differently (mask pixels,
        # polygon area), so an order by area can swap two regions of about the same size.
        for a in want:
            same = [b for b in got if names[b["category_id"] - 1] == ids[a["category_id"]]]
            b = min(same, key=lambda b: sum(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])))
            if masks == "rle":
                assert np.array_equal(mask_utils.decode(a["segmentation"]), mask_utils.decode(b["segmentation"]))
            else:  # the same polygons, through percent of the image size and back
                assert b["segmentation"][0] == pytest.approx(a["segmentation"][0], abs=0.02)
