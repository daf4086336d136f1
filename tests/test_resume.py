"""--resume for cron jobs: a grown folder gives the same file as one run over everything; runs
killed with SIGKILL (or stopped with Ctrl-C) at several points resume to the same bytes; a second
writer is locked out; changed models or settings are refused."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from segcli.predict.options import PredictOptions

from segcli.predict.run import run_predict
from segcli.errors import UsageError
from tests.test_predict_cli import photos  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The seeded small model, told (as `segcli train --min-size` records it) to work at 160 px:
    these tests are about files and processes, and 160 px makes each image ~10x cheaper than 512."""
    import torch

    from segcli.categories import coco_categories, coco_label_to_category_id
    from segcli.model.build import build_model
    from segcli.weights import save_checkpoint

    torch.manual_seed(0)
    state = build_model("maskrcnn_resnet18_fpn_small", 91).state_dict()
    state["roi_heads.box_predictor.cls_score.weight"] *= 3.0
    path = tmp_path_factory.mktemp("weights") / "small160.pt"
    save_checkpoint(path, state, "maskrcnn_resnet18_fpn_small", coco_categories(), coco_label_to_category_id(),
                    {"seed": 0, "input_size": {"min_size": 160, "max_size": 266}})
    return path


def make_images(folder: Path, sources: list[Path], names: list[str]) -> None:
    """Distinct small crops of real photos (the model works at 512 px whatever the input)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        photo = Image.open(sources[k % len(sources)])
        left = (k * 37) % 200
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        photo.crop((left, 40, left + 240, 220)).save(folder / name, quality=90)


def options(folder: Path, out: Path, checkpoint: Path, **extra) -> PredictOptions:  # noqa: F811
    settings = dict(device="cpu", precision="fp32", score_thr=0.05, max_det=10, workers=0, progress=False, quiet=True)
    return PredictOptions(sources=[str(folder)], out=str(out), weights=str(checkpoint), **(settings | extra))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_grown_folder_resumes_to_the_same_file_as_one_run(checkpoint, photos, tmp_path, suffix):  # noqa: F811
    folder = tmp_path / "photos"
    make_images(folder, photos, ["b.jpg", "d.jpg", "sub/a.jpg"])
    out = tmp_path / f"nightly{suffix}"
    first = run_predict(options(folder, out, checkpoint))
    assert first.images == 3 and first.reused == 0
    make_images(folder, photos[3:], ["c.jpg", "sub/0.jpg"])  # new files sort between the old ones
    second = run_predict(options(folder, out, checkpoint, resume=True))
    assert second.images == 2 and second.reused == 3
    reference = tmp_path / f"reference{suffix}"
    run_predict(options(folder, reference, checkpoint))
    assert out.read_bytes() == reference.read_bytes()
    if suffix == ".jsonl":
        return  # the rest is the same for every one-file format
    # A changed file is predicted again, a removed one leaves the output.
    make_images(folder, photos[4:], ["d.jpg"])
    os.unlink(folder / "b.jpg")
    third = run_predict(options(folder, out, checkpoint, resume=True))
    assert third.images == 1 and third.reused == 3
    run_predict(options(folder, reference, checkpoint))
    assert out.read_bytes() == reference.read_bytes()
    # Nothing new: nothing predicted, same file.
    assert run_predict(options(folder, out, checkpoint, resume=True)).images == 0
    assert out.read_bytes() == reference.read_bytes()


def test_changed_model_or_settings_are_refused_or_start_over(checkpoint, photos, tmp_path):  # noqa: F811
    folder, out = tmp_path / "photos", tmp_path / "p.json"
    make_images(folder, photos, ["a.jpg"])
    run_predict(options(folder, out, checkpoint))
    with pytest.raises(UsageError, match=r"different model or settings \(score_thr 0.05 -> 0.3\).*without --resume"):
        run_predict(PredictOptions(**{**options(folder, out, checkpoint, resume=True).__dict__, "score_thr": 0.3}))
    other = tmp_path / "other.pt"
    other.write_bytes(checkpoint.read_bytes() + b"")  # same bytes: the same model
    assert run_predict(PredictOptions(**{**options(folder, out, checkpoint, resume=True).__dict__,
                                         "weights": str(other)})).reused == 1
    before = out.read_bytes()
    import torch

    data = torch.load(checkpoint, weights_only=True)
    torch.save(data | {"note": "retrained"}, other)
    with pytest.raises(UsageError, match="weights"):
        run_predict(PredictOptions(**{**options(folder, out, checkpoint, resume=True).__dict__, "weights": str(other)}))
    assert out.read_bytes() == before  # refused runs leave the output alone
    # Without --resume the run starts over with the new settings.
    summary = run_predict(PredictOptions(**{**options(folder, out, checkpoint).__dict__, "score_thr": 0.3}))
    assert summary.images == 1 and summary.reused == 0 and json.loads(out.read_text())["info"]["score_thr"] == 0.3


def test_second_writer_is_locked_out_at_once(checkpoint, photos, tmp_path):  # noqa: F811
    folder, out = tmp_path / "photos", tmp_path / "p.json"
    make_images(folder, photos, ["a.jpg"])
    state = tmp_path / ".p.json.segcli"
    state.mkdir()
    with open(state / "lock", "a+") as held:  # what a running segcli holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "segcli", "predict", str(folder), "--out", str(out),
                                 "--weights", str(checkpoint)], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().startswith("segcli: error: another segcli run is writing this output")
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
        assert time.perf_counter() - started < 30  # before loading the model
    assert run_predict(options(folder, out, checkpoint)).images == 1  # released: works


def _journal_done(out: Path) -> int:
    journal = out.parent / f".{out.name}.segcli" / "journal.jsonl"
    try:
        return journal.read_bytes().count(b'"done"')
    except FileNotFoundError:
        return 0


def _start(folder: Path, out: Path, checkpoint: Path, *extra: str) -> subprocess.Popen:  # noqa: F811
    args = [sys.executable, "-m", "segcli", "predict", str(folder), "--out", str(out), "--weights", str(checkpoint),
            "--precision", "fp32", "--score-thr", "0.05", "--max-det", "10", "--workers", "0", "-q", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell starts background jobs (`pytest &`, CI wrappers) with SIGINT ignored, and children
    # inherit that: Ctrl-C would then never reach segcli. Give the child the default disposition.
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stop_when(process: subprocess.Popen, out: Path, done: int, sig: int) -> bytes:
    """Send `sig` once `done` inputs are in the journal; returns stderr."""
    deadline = time.time() + 120
    while _journal_done(out) < done and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(sig)
    return process.communicate(timeout=120)[1]


def test_sigkill_at_several_points_then_resume_gives_the_same_bytes(checkpoint, photos, tmp_path):  # noqa: F811
    folder = tmp_path / "photos"
    # Enough inputs after the last kill point that a run cannot finish before the signal lands.
    make_images(folder, photos, [f"img{k}.jpg" for k in range(8)])
    reference = tmp_path / "reference.json"
    ran = _start(folder, reference, checkpoint)
    assert ran.wait(timeout=300) == 0
    out = tmp_path / "out.json"
    state = tmp_path / ".out.json.segcli"
    # Killed before anything was done, after 1 and after 3 inputs; between two kills the journal
    # also gets a torn line and results of an input without its `done`, as a kill mid-write leaves.
    for point, resume in ((0, []), (1, ["--resume"]), (3, ["--resume"])):
        process = _start(folder, out, checkpoint, *resume)
        if point == 0:
            time.sleep(1.0)
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=60)
        else:
            _stop_when(process, out, point, signal.SIGKILL)
        assert process.returncode == -signal.SIGKILL
        assert not out.exists()  # the one-file output is only ever written whole, at the end
        if (state / "journal.jsonl").exists():
            with open(state / "journal.jsonl", "ab") as journal:
                journal.write(b'{"k": "[\\"x\\"]", "rec": {"file": "img9.jpg", "instances": []}}\n{"k": "[\\"img')
    finished = _start(folder, out, checkpoint, "--resume")
    assert finished.wait(timeout=300) == 0, finished.stderr.read()
    assert out.read_bytes() == reference.read_bytes()
    assert [i["file_name"] for i in json.loads(out.read_text())["images"]] == [f"img{k}.jpg" for k in range(8)]


def test_ctrl_c_leaves_a_valid_partial_output_that_resume_completes(checkpoint, photos, tmp_path):  # noqa: F811
    folder = tmp_path / "photos"
    count = 10  # enough that the signal lands before the run ends, on a loaded machine too
    make_images(folder, photos, [f"img{k}.jpg" for k in range(count)])
    jsonl = tmp_path / "p.jsonl"
    process = _start(folder, jsonl, checkpoint)
    stderr = _stop_when(process, jsonl, 1, signal.SIGINT)
    assert process.returncode == 130 and b"Traceback" not in stderr
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]  # valid, whole lines
    assert 1 <= len(lines) < count and [line["file"] for line in lines] == [f"img{k}.jpg" for k in range(len(lines))]
    # Per-image formats: the files written so far stay, and --resume writes only the rest.
    out = tmp_path / "labels"
    process = _start(folder, out, checkpoint, "--format", "yolo", "--max-det", "3")
    deadline = time.time() + 120
    while _journal_done_folder(out) < 1 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and b"Traceback" not in stderr
    done_before = _journal_done_folder(out)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.txt")}
    assert 1 <= done_before < count and len(first) >= done_before
    resumed = _start(folder, out, checkpoint, "--format", "yolo", "--max-det", "3", "--resume")
    assert resumed.wait(timeout=300) == 0
    assert sorted(p.name for p in out.glob("*.txt")) == sorted(f"img{k}.txt" for k in range(count))
    assert _journal_done_folder(out) == count
    rewritten = [name for name, mtime in first.items() if (out / name).stat().st_mtime_ns != mtime]
    assert len(rewritten) <= len(first) - done_before  # only an input cut short is predicted again


def _journal_done_folder(out: Path) -> int:
    try:
        return (out / ".segcli" / "journal.jsonl").read_bytes().count(b'"done"')
    except FileNotFoundError:
        return 0


def test_outputs_of_removed_inputs_are_removed_and_inputs_never_overwritten(checkpoint, photos, tmp_path):  # noqa: F811
    folder, out, overlay = tmp_path / "photos", tmp_path / "labels", tmp_path / "review"
    make_images(folder, photos, ["a.jpg", "sub/b.jpg"])
    keep = out / "notes.json"
    keep.parent.mkdir()
    keep.write_text("the user's own file")
    run_predict(options(folder, out, checkpoint, format="labelme", overlay=str(overlay), max_det=2))
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.json") if ".segcli" not in p.parts} == {"a.json", "sub/b.json", "notes.json"}
    assert (overlay / "sub" / "b.jpg").exists()
    os.unlink(folder / "sub" / "b.jpg")
    summary = run_predict(options(folder, out, checkpoint, format="labelme", overlay=str(overlay), max_det=2, resume=True))
    assert summary.images == 0 and summary.reused == 1
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.json") if ".segcli" not in p.parts} == {"a.json", "notes.json"}
    assert not (overlay / "sub" / "b.jpg").exists() and (overlay / "a.jpg").exists()
    with pytest.raises(UsageError, match="would overwrite the input"):
        run_predict(options(folder, out, checkpoint, format="labelme", overlay=str(folder)))
    assert (folder / "a.jpg").stat().st_size > 0
