"""What the README promises about stderr, exit codes and files, on real runs of the demo model
(issue 15): warnings survive --quiet, odd names stay on one line, `| head` ends segcli as it ends
any Unix tool, a run that never started leaves nothing behind, overlay videos follow the umask,
and the summary counts what it skipped in words a person would write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from segcli.cli import app
from tests.conftest import ROOT, synthetic_shapes

DEMO = "shapes_demo"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Two 96 px images of the shapes the demo model finds, with their COCO ground truth."""
    return synthetic_shapes().generate(tmp_path_factory.mktemp("shapes"), images=2, size=96, seed=11)


def predict(*args: str | Path):
    return CliRunner().invoke(app, ["predict", *map(str, args), "--weights", DEMO, "--device", "cpu"])


def folder_with_a_bad_image(tmp_path: Path, shapes: Path, bad_name: str) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    image = sorted((shapes.parent / "images").iterdir())[0]
    (folder / image.name).write_bytes(image.read_bytes())
    (folder / bad_name).write_bytes(b"not a picture")
    return folder


def test_quiet_still_says_why_an_input_failed_and_odd_names_stay_on_one_line(shapes, tmp_path):
    folder = folder_with_a_bad_image(tmp_path, shapes, "bad\nname\t\x1b.png")
    result = predict(folder, "--out", tmp_path / "p.json", "-q")
    assert result.exit_code == 1
    # Exactly the one line the README promises, even with --quiet; the name as `ls -b` writes it.
    assert result.stderr == f"warning: skipped {folder}/bad\\nname\\t\\033.png: not an image (cannot identify format)\n"
    result = predict(folder, "--out", tmp_path / "p.json")
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 3, lines  # the warning, the summary, its list of failures
    assert lines[0].startswith("warning: skipped ") and lines[2] == f"  {folder}/bad\\nname\\t\\033.png: not an image (cannot identify format)"


def test_summary_speaks_in_singulars_counts_other_files_and_times_the_first_result(shapes, tmp_path):
    folder = folder_with_a_bad_image(tmp_path, shapes, "broken.jpg")
    for name in ("animation.gif", "phone.heic", "other.GIF", "notes"):
        (folder / name).write_bytes(b"x")
    (folder / ".hidden.gif").write_bytes(b"x")  # hidden files are not looked at, nor counted
    result = predict(folder, "--out", tmp_path / "p.json", "--score-thr", "0.99", "--max-det", "1")
    summary = next(line for line in result.stderr.splitlines() if line.startswith("segcli: "))
    assert summary.startswith("segcli: 1 image, "), summary
    assert " 1 detection " in summary or " 0 detections " in summary, summary
    assert "first result " in summary and " s after start)" in summary, summary
    assert "; 4 files of other types in SOURCE folders not read (.gif 2, .heic 1, no extension 1); " in summary, summary
    assert summary.endswith("; 1 input failed:"), summary


def test_a_run_that_fails_before_any_work_leaves_no_state_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCLI_HOME", str(tmp_path / "home"))
    image = ROOT / "examples" / "images" / "000000471345.jpg"
    existing = tmp_path / "existing"
    existing.mkdir()
    offline = "http://127.0.0.1:9/maskrcnn.pt"  # nothing listens there: as good as offline
    for out in (tmp_path / "new" / "deeper" / "preds.json", existing / "preds.json", tmp_path / "labels" / ""):
        result = CliRunner().invoke(app, ["predict", str(image), "--out", str(out), "--weights", offline,
                                          "--format", "labelme" if str(out).endswith("/") else "coco"])
        assert result.exit_code == 3, result.output
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("segcli: error: could not download")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "home"]
    assert list(existing.iterdir()) == []


def _segcli_with_stdout_closed(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run segcli with a stdout pipe whose reader has already gone, as `| head` leaves it."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "OMP_NUM_THREADS": "1"}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "segcli", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env, timeout=300)
    finally:
        os.close(write)


@pytest.mark.parametrize("command", ["predict-jsonl", "predict-coco", "eval"])
def test_a_reader_that_goes_away_ends_segcli_by_sigpipe_and_nothing_is_left(command, shapes, tmp_path):
    images, pred = shapes.parent / "images", tmp_path / "pred.json"
    if command == "eval":
        truth = json.loads(shapes.read_text())
        pred.write_text(json.dumps([{**{k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")},
                                     "score": 0.9} for a in truth["annotations"]]))
        args = ["eval", "--gt", str(shapes), "--pred", str(pred)]
    else:
        args = ["predict", str(images), "--weights", DEMO, "--device", "cpu",
                "--format", command.split("-")[1], "--overlay", str(tmp_path / "review")]
    result = _segcli_with_stdout_closed(args, tmp_path)
    # As `cat big | head` ends cat: killed by SIGPIPE (the shell shows 141), no message, no traceback.
    assert result.returncode == -signal.SIGPIPE, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Broken pipe" not in result.stderr, result.stderr
    assert list((tmp_path / "tmp").iterdir()) == []  # the private journal of `--format coco` to stdout is gone


def test_overlay_videos_follow_the_umask_like_every_other_output(tmp_path):
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (96, 64))
    for value in range(4):
        writer.write(np.full((64, 96, 3), 60 * value, np.uint8))
    writer.release()
    previous = os.umask(0o027)
    try:
        result = predict(clip, "--out", tmp_path / "p.json", "--overlay", tmp_path / "review", "--vid-stride", "2")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    written = [p for p in (tmp_path / "review").rglob("*") if p.suffix in (".mp4", ".avi")]
    assert len(written) == 1 and written[0].stat().st_size > 0
    assert written[0].stat().st_mode & 0o777 == 0o640  # 0666 & ~027, as open() would make it; mkstemp gives 0600
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o640


def test_train_weights_none_is_random_initialization(shapes, tmp_path):
    """`--weights none` trains exactly what omitting --weights trains (same seed: same weights)."""
    common = ["train", "--coco", str(shapes), "--arch", "maskrcnn_resnet18_fpn_tiny", "--epochs", "1",
              "--batch-size", "2", "--workers", "0", "--device", "cpu", "--min-size", "96", "-q"]
    states = []
    for extra, out in ((["--weights", "none"], "none"), (["--weights", "NONE"], "upper"), ([], "omitted")):
        result = CliRunner().invoke(app, [*common, *extra, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        checkpoint = torch.load(tmp_path / out / "last.pt", map_location="cpu", weights_only=True)
        assert checkpoint["meta"]["init"] == "random initialization"
        assert checkpoint["meta"]["settings"]["weights"] is None
        assert checkpoint["meta"]["settings"]["freeze_bn"] is None  # BatchNorm trained, as from scratch
        states.append(checkpoint["model"])
    for other in states[1:]:
        assert all(torch.equal(states[0][key], other[key]) for key in states[0])


def test_the_command_list_gives_each_summary_unbroken():
    """`segcli --help` lists each subcommand's first paragraph as running text, not cut where its
    docstring's lines end."""
    import inspect

    import typer

    group = typer.main.get_command(app)
    result = CliRunner().invoke(app, ["--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    rows = [" ".join(line.strip("│ ").split()) for line in result.output.splitlines()]
    for name, command in group.commands.items():
        summary = " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split())
        assert any(row == f"{name} {summary}" for row in rows), (name, summary, result.output)
