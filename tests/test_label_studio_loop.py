"""The annotation loop against a REAL Label Studio server: predict -> review -> push the worst 5 ->
a person edits through the API (moves a polygon, deletes one, adds one; skips a task) -> pull ->
train 1 epoch; the pulled COCO holds exactly the edits. Plus the failures a user meets: wrong
URL, refused token, missing project, images the server cannot load, a server gone mid-push.

The server: tests/label_studio_server.py. Not installed: skipped, unless
SEGCLI_REQUIRE_LABEL_STUDIO=1 (CI), where a missing or failing server fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from tests.conftest import free_port, synthetic_shapes
from tests.label_studio_server import (TOKEN, Server, ServerFailed, label_studio_bin,
                                       running_label_studio)

REQUIRED = os.environ.get("SEGCLI_REQUIRE_LABEL_STUDIO") == "1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    binary = label_studio_bin()
    if binary is None:
        message = "label-studio is not installed (pip install label-studio in a venv of its own; see .ci/run)"
        if REQUIRED:
            pytest.fail(message + " but SEGCLI_REQUIRE_LABEL_STUDIO=1")
        pytest.skip(message)
    try:
        with running_label_studio(binary, tmp_path_factory.mktemp("label-studio")) as started:
            yield started
    except ServerFailed as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """8 synthetic shapes images (128 px), predicted by the shipped demo model, and their review."""
    root = tmp_path_factory.mktemp("loop")
    synthetic_shapes().generate(root / "set", images=8, size=128, seed=7)
    images = root / "set" / "images"
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(images), "--weights", "shapes_demo", "--out", str(root / "pred.json"), "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["review", str(root / "pred.json"), "--out", str(root / "review.csv"), "-q"])
    assert result.exit_code == 0, result.output
    return root, images


def _push(server: Server, root: Path, images: Path, project: str, *extra: str, url: str | None = None):
    return CliRunner().invoke(app, ["push", str(root / "pred.json"), "--label-studio", url or server.url,
                                    "--project", project, "--token", TOKEN, "--images", str(images), *extra])


def _project_id(server: Server, title: str) -> int:
    answer = server.api("GET", f"/api/projects?title={title}")
    return next(p["id"] for p in answer["results"] if p["title"] == title)


def _pixels(result: dict) -> list[float]:
    w, h = result["original_width"], result["original_height"]
    return [round(c, 2) for x, y in result["value"]["points"] for c in (x * w / 100.0, y * h / 100.0)]


def test_predict_review_push_edit_pull_train(server, predicted, tmp_path):
    root, images = predicted
    ranked = [line.split(",")[1] for line in (root / "review.csv").read_text().splitlines()[1:]]
    result = _push(server, root, images, "loop", "--review", str(root / "review.csv"), "--top", "5")
    assert result.exit_code == 0, result.output
    project_id = _project_id(server, "loop")
    tasks = server.tasks(project_id)
    assert sorted(t["data"]["segcli_file"] for t in tasks) == sorted(ranked[:5])
    # Safe to rerun: nothing is added twice.
    result = _push(server, root, images, "loop", "--review", str(root / "review.csv"), "--top", "5")
    assert result.exit_code == 0, result.output
    assert "added 0 tasks, 5 were there already" in result.output
    assert len(server.tasks(project_id)) == 5
    # Label Studio serves the pushed images (local files under the project's storage).
    with urllib.request.urlopen(urllib.request.Request(server.url + tasks[0]["data"]["image"],
                                headers={"Authorization": f"Token {TOKEN}"}), timeout=30) as response:
        assert response.status == 200 and response.read(8) == b"\x89PNG\r\n\x1a\n"

    by_file = {t["data"]["segcli_file"]: t for t in tasks}
    edited_task, accepted_task, skipped_task = (by_file[name] for name in ranked[:3])
    # A person edits the first: moves the first polygon 3% right, deletes the last, adds a square.
    regions = [r for r in edited_task["predictions"][0]["result"] if r["type"] == "polygonlabels"]
    assert len(regions) >= 2, "the demo model should find at least 2 shapes on the worst image"
    edited = [dict(r, value=dict(r["value"])) for r in regions[:-1]]
    edited[0]["value"]["points"] = [[x + 3.0, y] for x, y in edited[0]["value"]["points"]]
    added = {"from_name": "label", "to_name": "image", "type": "polygonlabels", "original_width": 128,
             "original_height": 128, "value": {"points": [[10, 10], [30, 10], [30, 30], [10, 30]],
                                               "polygonlabels": ["square"], "closed": True}}
    edited.append(added)
    for region in edited:
        region.pop("score", None)
    server.api("POST", f"/api/tasks/{edited_task['id']}/annotations", {"result": edited})
    # The second is accepted as predicted; the third skipped; the last two left alone.
    accepted = [r for r in accepted_task["predictions"][0]["result"] if r["type"] == "polygonlabels"]
    server.api("POST", f"/api/tasks/{accepted_task['id']}/annotations", {"result": accepted})
    server.api("POST", f"/api/tasks/{skipped_task['id']}/annotations", {"result": [], "was_cancelled": True})

    out = tmp_path / "corrected.json"
    result = CliRunner().invoke(app, ["pull", "--label-studio", server.url, "--project", "loop",
                                      "--token", TOKEN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 2 images" in result.output
    assert "2 not annotated yet" in result.output and "1 skipped by the annotator" in result.output
    coco = json.loads(out.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert list(names.values()) == list(synthetic_shapes().CLASSES)
    for task, expected in ((edited_task, edited), (accepted_task, accepted)):
        image = next(i for i in coco["images"] if i["file_name"] == task["data"]["segcli_file"])
        got = sorted((names[a["category_id"]], a["segmentation"][0]) for a in coco["annotations"]
                     if a["image_id"] == image["id"])
        want = sorted((r["value"]["polygonlabels"][0], _pixels(r)) for r in expected)
        assert got == want
    square = next(a for a in coco["annotations"] if a["segmentation"][0] == [12.8, 12.8, 38.4, 12.8, 38.4, 38.4, 12.8, 38.4])
    assert square["bbox"] == pytest.approx([12.8, 12.8, 25.6, 25.6], abs=1.0)

    train = subprocess.run(
        [sys.executable, "-m", "segcli", "train", "--coco", str(out), "--images", str(images),
         "--arch", "maskrcnn_resnet18_fpn_tiny", "--epochs", "1", "--batch-size", "2", "--min-size", "96",
         "--max-size", "128", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run"), "-q"],
        capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (tmp_path / "run" / "last.pt").is_file()


def test_brush_push_round_trips_masks(server, predicted, tmp_path):
    root, images = predicted
    result = _push(server, root, images, "brush", "--shape", "brush")
    assert result.exit_code == 0, result.output
    task = server.tasks(_project_id(server, "brush"))[0]
    regions = task["predictions"][0]["result"]
    assert regions and all(r["type"] == "brushlabels" for r in regions)
    server.api("POST", f"/api/tasks/{task['id']}/annotations", {"result": regions})
    out = tmp_path / "brush.json"
    result = CliRunner().invoke(app, ["pull", "--label-studio", server.url, "--project", "brush",
                                      "--token", TOKEN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    from pycocotools import mask as mask_utils

    pulled = json.loads(out.read_text())
    predictions = json.loads((root / "pred.json").read_text())
    image_id = next(i["id"] for i in predictions["images"] if i["file_name"] == task["data"]["segcli_file"])
    want = sorted(mask_utils.area(a["segmentation"]) for a in predictions["annotations"] if a["image_id"] == image_id)
    got = sorted(mask_utils.area(a["segmentation"]) for a in pulled["annotations"])
    assert got == want


def _one_line(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("segcli: error:")]
    assert len(errors) == 1 and text in errors[0] and "Traceback" not in result.output, result.output


def test_bad_servers_tokens_projects_and_images(server, predicted, tmp_path):
    root, images = predicted
    _one_line(_push(server, root, images, "x", url=f"http://127.0.0.1:{free_port()}"), 3, "cannot reach Label Studio")
    result = CliRunner().invoke(app, ["push", str(root / "pred.json"), "--label-studio", server.url,
                                      "--project", "x", "--token", "wrong", "--images", str(images)])
    _one_line(result, 3, "refused the token")
    result = CliRunner().invoke(app, ["pull", "--label-studio", server.url, "--project", "no such project",
                                      "--token", TOKEN, "--out", str(tmp_path / "a.json")])
    _one_line(result, 2, "has no project 'no such project'")
    assert not (tmp_path / "a.json").exists()
    # Images the server cannot load: refused before any task is imported.
    result = _push(server, root, images, "unreachable", "--image-url-prefix", f"http://127.0.0.1:{free_port()}/")
    _one_line(result, 3, "Label Studio cannot load image")
    assert server.tasks(_project_id(server, "unreachable")) == []


class _DyingProxy(BaseHTTPRequestHandler):
    """Forwards to the real server, and drops the connection on the second import (a server that
    went away mid-push, after committing the first batch)."""

    target = ""
    imports = 0

    def _forward(self) -> None:
        if self.path.endswith("/import"):
            type(self).imports += 1
            if type(self).imports == 2:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        request = urllib.request.Request(self.target + self.path, data=body, method=self.command,
                                         headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, payload, kind = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            status, payload, kind = error.code, error.read(), error.headers.get("Content-Type", "")
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = _forward

    def log_message(self, *args) -> None:
        pass


def test_a_server_dying_mid_push_leaves_no_duplicates_on_rerun(server, predicted, monkeypatch):
    import segcli.labeling.label_studio as label_studio

    root, images = predicted
    monkeypatch.setattr(label_studio, "BATCH", 3)
    _DyingProxy.target, _DyingProxy.imports = server.url, 0
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _DyingProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        result = _push(server, root, images, "dying", url=f"http://127.0.0.1:{proxy.server_address[1]}")
    finally:
        proxy.shutdown()
    _one_line(result, 3, "Label Studio")
    project_id = _project_id(server, "dying")
    assert len(server.tasks(project_id)) == 3  # the first batch landed
    result = _push(server, root, images, "dying")
    assert result.exit_code == 0, result.output
    assert "added 5 tasks, 3 were there already" in result.output
    files = [t["data"]["segcli_file"] for t in server.tasks(project_id)]
    assert len(files) == 8 == len(set(files))


def test_predict_format_label_studio_imports_into_a_real_project(server, predicted, tmp_path):
    """The file `predict --format label-studio` writes is what Label Studio's import takes: every
    image a task with its pre-annotations, the image served from the local files by its path."""
    from segcli.writers.label_studio import labeling_config

    root, images = predicted
    tasks_file = tmp_path / "tasks.json"
    result = CliRunner().invoke(app, ["predict", str(images), "--weights", "shapes_demo", "--format", "label-studio",
                                      "--masks", "polygon", "--out", str(tasks_file), "-q"])
    assert result.exit_code == 0, result.output
    project = server.api("POST", "/api/projects", {"title": "from-predict",
                                                    "label_config": labeling_config(list(synthetic_shapes().CLASSES))})
    server.api("POST", "/api/storages/localfiles", {"project": project["id"], "path": str(images.resolve()),
                                                     "title": "images", "use_blob_urls": True})
    server.api("POST", f"/api/projects/{project['id']}/import", json.loads(tasks_file.read_text()))
    tasks = server.tasks(project["id"])
    predictions = json.loads((root / "pred.json").read_text())
    assert sorted(t["data"]["segcli_file"] for t in tasks) == sorted(i["file_name"] for i in predictions["images"])
    detections = {i["file_name"]: sum(a["image_id"] == i["id"] for a in predictions["annotations"])
                  for i in predictions["images"]}
    for task in tasks:
        [prediction] = task["predictions"]  # the server kept the pre-annotations as given
        assert prediction["model_version"].startswith("segcli")
        assert all(r["type"] == "polygonlabels" for r in prediction["result"])
        assert len(prediction["result"]) >= detections[task["data"]["segcli_file"]] > 0  # a region per part
    with urllib.request.urlopen(urllib.request.Request(server.url + tasks[0]["data"]["image"],
                                headers={"Authorization": f"Token {TOKEN}"}), timeout=30) as response:
        assert response.status == 200 and response.read(8) == b"\x89PNG\r\n\x1a\n"
