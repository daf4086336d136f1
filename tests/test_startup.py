"""Start-up: a run imports only what it uses (issue 15). An image-only predict to COCO RLE never
loads OpenCV (video, overlays, polygons and PNG outputs need it), shapely (polygons), rich (the
live bar, drawn on terminals only) or ONNX; `segcli eval` never loads torch. Each check runs
segcli in a fresh interpreter and reads `sys.modules` as the process exits, so a later import
added at the top of a module shows up here. (The time saved is measured by
benchmarks/startup.py, not asserted.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import synthetic_shapes

PROBE = """
import atexit, json, sys
record, sys.argv = sys.argv[1], ["segcli", *sys.argv[2:]]
atexit.register(lambda: open(record, "w").write(json.dumps(sorted({m.split(".")[0] for m in sys.modules}))))
from segcli.cli import main
main()
"""


def loaded_packages(tmp_path: Path, *args: str) -> set[str]:
    record = tmp_path / "modules.json"
    result = subprocess.run([sys.executable, "-c", PROBE, str(record), *args], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(json.loads(record.read_text()))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return synthetic_shapes().generate(tmp_path_factory.mktemp("shapes"), images=2, size=64, seed=2)


def test_an_image_only_predict_loads_no_opencv_shapely_rich_or_onnx(shapes, tmp_path):
    images = str(shapes.parent / "images")
    plain = loaded_packages(tmp_path, "predict", images, "--weights", "shapes_demo", "--out", "preds.json")
    assert {"torch", "torchvision", "pycocotools", "PIL"} <= plain  # the probe sees what the run used
    assert not plain & {"cv2", "shapely", "rich", "onnx", "onnxruntime", "matplotlib"}, plain
    # The same run asking for polygons does need OpenCV and shapely: the check above can fail.
    polygons = loaded_packages(tmp_path, "predict", images, "--weights", "shapes_demo", "--out", "polygons.json",
                               "--masks", "polygon")
    assert {"cv2", "shapely"} <= polygons


def test_eval_loads_no_torch(shapes, tmp_path):
    truth = json.loads(shapes.read_text())
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([{**{k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")}, "score": 0.9}
                                for a in truth["annotations"]]))
    loaded = loaded_packages(tmp_path, "eval", "--gt", str(shapes), "--pred", str(pred), "--report", "report.json")
    assert "pycocotools" in loaded and not loaded & {"torch", "torchvision", "cv2"}, loaded
