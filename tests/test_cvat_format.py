"""`segcli predict --format cvat`: CVAT for images 1.1 XML (images) and CVAT for video 1.1 (one
video, tracks). Read back by CVAT's own importer code (datumaro's `cvat` format, which CVAT's
server uses for its CVAT formats) when datumaro is installed in a venv of its own (env
SEGCLI_DATUMARO_PYTHON, else ./.dm-venv/bin/python; .ci/run installs it and sets
SEGCLI_REQUIRE_DATUMARO=1), and always by our own reading of the XML against the JSON Lines of
the same run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from segcli.cli import app
from segcli.writers.cvat import cvat_mask_rle, decode_cvat_mask_rle
from tests.conftest import ROOT, synthetic_shapes

REQUIRED = os.environ.get("SEGCLI_REQUIRE_DATUMARO") == "1"


def test_cvat_mask_rle_round_trips_and_starts_with_zeros():
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 40), bool)
    mask[5:20, 3:30] = rng.random((15, 27)) > 0.3
    mask[5, 3] = True  # the crop starts on a 1: the RLE starts with an empty run of 0s
    rle, left, top, width, height = cvat_mask_rle(mask)
    assert rle.startswith("0,") and (left, top) == (3, 5)
    crop = decode_cvat_mask_rle(rle, width, height)
    canvas = np.zeros_like(mask)
    canvas[top:top + height, left:left + width] = crop
    assert np.array_equal(canvas, mask)
    assert cvat_mask_rle(np.zeros((4, 4), bool)) is None
    # A crop of a larger mask, placed by its origin, gives the larger mask's RLE and box.
    assert cvat_mask_rle(mask[2:, 1:], origin=(1, 2)) == (rle, left, top, width, height)


def _datumaro_python() -> Path:
    python = Path(os.environ.get("SEGCLI_DATUMARO_PYTHON") or ROOT / ".dm-venv" / "bin" / "python")
    if not python.exists():
        message = "datumaro is not installed (python -m venv .dm-venv && .dm-venv/bin/pip install datumaro)"
        if REQUIRED:
            pytest.fail(message + " but SEGCLI_REQUIRE_DATUMARO=1")
        pytest.skip(message)
    return python


READ = """
import json, sys
import datumaro as dm
dataset = dm.Dataset.import_from(sys.argv[1], "cvat")
labels = dataset.categories()[dm.AnnotationType.label]
out = {}
for item in dataset:
    shapes = []
    for a in item.annotations:
        name = labels[a.label].name
        track = a.attributes.get("track_id")
        if a.type == dm.AnnotationType.mask:
            shapes.append([name, "mask", a.image.astype(int).tolist(), track])
        elif a.type == dm.AnnotationType.polygon:
            shapes.append([name, "polygon", [round(p, 2) for p in a.points], track])
    out[str(item.attributes.get("frame", item.id)) if sys.argv[3] == "frames" else item.id] = shapes
json.dump(out, open(sys.argv[2], "w"))
"""


def _read_with_datumaro(xml_file: Path, by: str, images: Path | None = None) -> dict:
    """Datumaro's reading of `xml_file`; `images`: the folder of the images it names, linked in
    beside it as `images/` (the layout of CVAT's own export), where the importer looks for them."""
    python = _datumaro_python()
    if images is not None and not (xml_file.parent / "images").exists():
        (xml_file.parent / "images").symlink_to(images.resolve(), target_is_directory=True)
    out = xml_file.with_suffix(".read.json")
    subprocess.run([str(python), "-c", READ, str(xml_file), str(out), by], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": ""}, cwd=xml_file.parent)
    return json.loads(out.read_text())


def _predict(*args: str) -> None:
    result = CliRunner().invoke(app, ["predict", *args, "--weights", "shapes_demo", "-q"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cvat")
    synthetic_shapes().generate(folder / "set", images=3, size=96, seed=4)
    return folder / "set" / "images"


@pytest.mark.parametrize("masks", ["rle", "polygon"])
def test_datumaro_cvat_importer_reads_segcli_xml(images, tmp_path, masks):
    coco_file, xml_file = tmp_path / "pred.json", tmp_path / "annotations.xml"
    _predict(str(images), "--format", "coco", "--masks", masks, "--out", str(coco_file))
    _predict(str(images), "--masks", masks, "--out", str(xml_file))  # .xml: cvat
    root = ET.parse(xml_file).getroot()
    assert root.find("meta/task/mode").text == "annotation"
    read = _read_with_datumaro(xml_file, "items", images)
    coco = json.loads(coco_file.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(read) == sorted(Path(i["file_name"]).stem for i in coco["images"])
    for image in coco["images"]:
        shapes = read[Path(image["file_name"]).stem]
        detections = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert detections, "the demo model finds shapes on every synthetic image"
        if masks == "rle":
            want = sorted((names[a["category_id"]], mask_utils.decode(a["segmentation"]).tolist()) for a in detections)
            assert sorted((name, mask) for name, _, mask, _ in shapes) == want
        else:  # every part of every mask is a polygon of its own
            want = sorted((names[a["category_id"]], part) for a in detections for part in a["segmentation"])
            assert sorted((name, points) for name, _, points, _ in shapes) == want


def _moving_shapes():
    spec = importlib.util.spec_from_file_location("moving_shapes", ROOT / "examples" / "moving_shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    """A short video of moving shapes predicted with --track, as JSON Lines and as CVAT XML."""
    folder = tmp_path_factory.mktemp("cvat-video")
    video = folder / "shapes.avi"
    _moving_shapes().generate(video, frames=10, size=128)
    runs = {}
    for masks in ("polygon", "rle"):
        lines, xml_file = folder / f"{masks}.jsonl", folder / f"{masks}.xml"
        for out in (lines, xml_file):
            _predict(str(video), "--track", "--vid-stride", "2", "--masks", masks, "--out", str(out))
        runs[masks] = [json.loads(line) for line in lines.read_text().splitlines()], xml_file
    return runs


def _track_shapes(xml_file: Path) -> dict[int, list[tuple[int, int, str, dict]]]:
    """Our reading: track number -> [(frame, outside, label, attributes)]."""
    root = ET.parse(xml_file).getroot()
    assert root.find("meta/task/mode").text == "interpolation"
    return {int(track.get("id")): [(int(s.get("frame")), int(s.get("outside")), track.get("label"), s.attrib)
                                   for s in track] for track in root.iter("track")}


@pytest.mark.parametrize("masks", ["polygon", "rle"])
def test_a_tracked_video_becomes_one_cvat_track_per_track_id(video_run, masks):
    records, xml_file = video_run[masks]
    tracks = _track_shapes(xml_file)
    predicted_frames = [r["frame"] for r in records]
    assert predicted_frames == list(range(0, 10, 2))
    by_id: dict[int, list[tuple[int, dict]]] = {}
    for record in records:
        for instance in record["instances"]:
            by_id.setdefault(instance["track_id"], []).append((record["frame"], instance))
    assert len(tracks) == len(by_id) > 1
    # Tracks come in order of first appearance, like segcli's ids: same order, one each.
    for (number, shapes), (track_id, seen) in zip(sorted(tracks.items()), sorted(by_id.items())):
        keyframes = [(frame, attributes) for frame, outside, _, attributes in shapes if not outside]
        assert [frame for frame, _ in keyframes] == [frame for frame, _ in seen]
        assert all(attributes["keyframe"] == "1" for _, attributes in keyframes)
        # Hidden on the first predicted frame the object is missing from, until it comes back.
        present = {frame for frame, _ in seen}
        expected_outside = sorted({predicted_frames[i + 1] for i, f in enumerate(predicted_frames[:-1])
                                   if f in present and predicted_frames[i + 1] not in present})
        assert sorted(frame for frame, outside, _, _ in shapes if outside) == expected_outside
        for (frame, attributes), (_, instance) in zip(keyframes, seen):
            if masks == "rle":
                mask = decode_cvat_mask_rle(attributes["rle"], int(attributes["width"]), int(attributes["height"]))
                full = np.zeros((128, 128), bool)
                left, top = int(attributes["left"]), int(attributes["top"])
                full[top:top + mask.shape[0], left:left + mask.shape[1]] = mask
                assert np.array_equal(full, mask_utils.decode(instance["segmentation"]).astype(bool))
            else:
                points = [float(v) for pair in attributes["points"].split(";") for v in pair.split(",")]
                exterior = [v for point in instance["polygons"][0][0][:-1] for v in point]
                assert points == pytest.approx(exterior, abs=0.006)


def test_datumaro_reads_the_video_tracks(video_run):
    records, xml_file = video_run["polygon"]
    read = _read_with_datumaro(xml_file, "frames")
    # Datumaro expands tracks into per-frame shapes (outside ones included, marked by attribute);
    # every predicted instance is there at its frame, in its track.
    numbers = {}
    for record in records:
        for instance in record["instances"]:
            numbers.setdefault(instance["track_id"], len(numbers))
    for record in records:
        shapes = read[str(record["frame"])]
        got = sorted((track, points[:4]) for _, kind, points, track in shapes if kind == "polygon")
        want = [(numbers[i["track_id"]], [round(v, 2) for point in i["polygons"][0][0][:2] for v in point])
                for i in record["instances"]]
        assert all(item in got for item in want), (record["frame"], got, want)


def test_images_beside_a_video_are_refused_before_any_work(images, video_run, tmp_path):
    _, xml_file = video_run["rle"]
    video = xml_file.parent / "shapes.avi"
    out = tmp_path / "both.xml"
    result = CliRunner().invoke(app, ["predict", str(images), str(video), "--weights", "shapes_demo",
                                      "--format", "cvat", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "holds images or one video" in result.output and "Traceback" not in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["predict", str(video), "--weights", "shapes_demo",
                                      "--format", "label-studio", "--out", str(tmp_path / "tasks.json")])
    assert result.exit_code == 2 and "is a video" in result.output, result.output
