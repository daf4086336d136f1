"""--streams: batches predicted side by side on the CPU, results in input order and unchanged."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import torch

from segcli.predict.options import PredictOptions
from segcli.predict.run import run_predict
from segcli.predict.streams import predicted
from tests.conftest import COCO_TINY_VAL, require
from tests.test_predict_cli import checkpoint, segcli  # noqa: F401  (the seeded small model fixture)


def test_events_leave_in_order_with_at_most_n_batches_in_flight():
    rng = random.Random(0)
    running, most, lock = [0], [0], threading.Lock()
    threads_seen = set()

    def predict(batch):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threads_seen.add(torch.get_num_threads())
        time.sleep(rng.random() * 0.01)  # later batches often finish first
        with lock:
            running[0] -= 1
        return [f"result {item}" for item in batch]

    events = []
    for k in range(40):
        events.append([k, k + 100])
        if k % 7 == 0:
            events.append(f"done {k}")  # an input done / failed: must wait for the batches before it
    before = torch.get_num_threads()
    out = list(predicted(iter(events), predict, 3))
    assert [event for event, _ in out] == events
    for event, results in out:
        assert results == ([f"result {item}" for item in event] if isinstance(event, list) else None)
    assert most[0] == 3  # really side by side, never more
    assert threads_seen == {max(1, before // 3)}
    assert torch.get_num_threads() == before  # the run gives the process its thread count back


def test_one_stream_runs_inline():
    seen = []
    out = list(predicted(iter([[1], "x", [2]]), lambda batch: seen.append(threading.current_thread()) or batch, 1))
    assert out == [([1], [1]), ("x", None), ([2], [2])]
    assert set(seen) == {threading.current_thread()}


def test_two_streams_write_the_same_files_as_one(checkpoint, tmp_path):  # noqa: F811
    """fp32 results do not depend on the thread count, so two streams must give the very same
    bytes as one, with a bad input among the photos (its warning, its place)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in sorted(require(COCO_TINY_VAL).glob("*.jpg"))[:4]:
        shutil.copy(photo, folder / photo.name)
    (folder / "broken.jpg").write_text("not a picture")
    outputs = {}
    for streams in (1, 2):
        out = tmp_path / f"s{streams}.json"
        result = segcli("predict", str(folder), "--weights", str(checkpoint), "--precision", "fp32",
                        "--streams", str(streams), "--out", str(out))
        assert result.returncode == 1, result.stderr  # the broken photo
        assert sum(line.startswith("warning:") and "broken.jpg" in line for line in result.stderr.splitlines()) == 1
        outputs[streams] = out.read_bytes()
    assert outputs[1] == outputs[2]
    assert b'"annotations": []' not in outputs[1]


def test_streams_in_process_keep_the_summary(checkpoint, tmp_path):  # noqa: F811
    photos = [str(p) for p in sorted(require(COCO_TINY_VAL).glob("*.jpg"))[:3]]
    summary = run_predict(PredictOptions(sources=photos, out=str(tmp_path / "p.json"), weights=str(checkpoint),
                                         device="cpu", precision="fp32", streams=2, quiet=True, progress=False))
    assert summary.images == 3 and not summary.failures
    assert Path(tmp_path / "p.json").exists()
