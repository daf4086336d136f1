"""Runs at the same time: two `segcli predict --out same.json` (the lock refuses the second with one
line, exit 2, and the first finishes its file; started staggered and at the same instant), and a
reader polling the output while a run rewrites it (it sees the old file or the new one, never a
mix or a torn file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_predict_cli import photos  # noqa: F401  (fixture)
from tests.test_resume import checkpoint, make_images  # noqa: F401  (fixture: the small model at 160 px)


def start(folder: Path, out: Path, weights: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "segcli", "predict", str(folder), "--out", str(out), "--weights", str(weights),
            "--device", "cpu", "--precision", "fp32", "--score-thr", "0.05", "--max-det", "10", "--workers", "0",
            "-q", *extra]
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _journal(out: Path) -> bytes:
    try:
        return (out.parent / f".{out.name}.segcli" / "journal.jsonl").read_bytes()
    except FileNotFoundError:
        return b""


def _lock_held(out: Path, pid: int) -> bool:
    lock = out.parent / f".{out.name}.segcli" / "lock"
    try:
        # The running segcli writes its pid there once it holds the lock (a killed one's stays).
        return lock.read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def folder(photos, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("concurrent")
    make_images(root / "photos", photos, [f"img{k}.jpg" for k in range(6)])
    return root / "photos"


@pytest.fixture(scope="module")
def reference(folder, checkpoint, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("reference") / "one.json"
    process = start(folder, out, checkpoint)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return out.read_bytes()


@pytest.mark.parametrize("stagger, resume", [(True, False), (False, False), (True, True)])
def test_a_second_run_into_the_same_output_is_refused_with_one_line(folder, checkpoint, reference, tmp_path,  # noqa: F811
                                                                    stagger, resume):
    """Two runs, or two `--resume` runs on one state folder (a cron job that overran into the next)."""
    out = tmp_path / "same.json"
    extra = ["--resume"] if resume else []
    if resume:  # a state folder with part of the work done: both would resume from it
        first = start(folder, out, checkpoint)
        deadline = time.time() + 120
        while b'"done"' not in _journal(out) and first.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    first = start(folder, out, checkpoint, *extra)
    if stagger:
        # The first holds the lock, and is held still (SIGSTOP) while the second runs: the second
        # must stop at once, whatever the speed of the machine.
        deadline = time.time() + 120
        while not _lock_held(out, first.pid) and first.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        second = start(folder, out, checkpoint, *extra)
        _, refused = second.communicate(timeout=300)
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, first.stderr.read()
        assert second.returncode == 2, refused
    else:
        # Both at the same instant: one takes the lock before loading its model, the other is
        # refused; on a slow machine the second may start after the first ended: then it just runs.
        second = start(folder, out, checkpoint)
        results = [(p, *p.communicate(timeout=300)) for p in (first, second)]
        codes = sorted(p.returncode for p, _, _ in results)
        assert codes in ([0, 2], [0, 0]), [(p.returncode, err[-2000:]) for p, _, err in results]
        refused = next((err for p, _, err in results if p.returncode == 2), None)
        if refused is None:
            assert out.read_bytes() == reference
            pytest.skip("the two runs did not overlap: both ran, one after the other")
    lines = refused.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segcli: error: another segcli run is writing this output"), lines
    assert "Traceback" not in refused
    if stagger:
        assert f"(pid {first.pid})" in lines[0]
    # The winner's output is whole and is one run's file; its state folder is intact for --resume.
    assert out.read_bytes() == reference
    resumed = start(folder, out, checkpoint, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert out.read_bytes() == reference


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_reader_sees_the_old_file_or_the_new_one_never_a_mix(folder, checkpoint, tmp_path, suffix):  # noqa: F811
    out = tmp_path / f"watched{suffix}"
    old_run = start(folder, out, checkpoint, "--score-thr", "0.3")
    assert old_run.wait(timeout=300) == 0
    old = out.read_bytes()
    seen: dict[bytes, int] = {}
    missing = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal missing
        while not stop.is_set():
            try:
                with open(out, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                missing += 1
                continue
            seen[data] = seen.get(data, 0) + 1
            time.sleep(0.001)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        new_run = start(folder, out, checkpoint)  # other settings, no --resume: the file is rewritten
        assert new_run.wait(timeout=300) == 0, new_run.stderr.read()
        time.sleep(0.05)
    finally:
        stop.set()
        reader.join()
    new = out.read_bytes()
    assert new != old
    assert missing == 0  # the old file stays in place until the new one replaces it
    assert set(seen) <= {old, new}, [len(data) for data in seen]
    assert seen.get(old, 0) > 0 and seen.get(new, 0) > 0
    if suffix == ".json":
        json.loads(new)
    else:
        [json.loads(line) for line in new.splitlines()]
