"""Ray's faults: a cluster that cannot be reached (a wrong --ray-address or RAY_ADDRESS, a port
that takes the connection but never answers as Ray) is one line and exit code 3 within a bounded
time, never a hang; an actor killed mid-run is restarted by Ray and the output is byte-equal to
one process's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from segcli.predict.run import run_predict
from tests.conftest import ROOT, free_port
from tests.test_predict_cli import photos  # noqa: F401  (fixture)
from tests.test_ray_predict import cluster  # noqa: F401  (fixture)
from tests.test_resume import checkpoint  # noqa: F401  (fixture)
from tests.test_scale_out import one_run, one_thread, options, sources  # noqa: F401  (fixtures)

pytestmark = pytest.mark.ray


def _predict(sources, out: Path, checkpoint: Path, *flags: str, env: dict | None = None,  # noqa: F811
             timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "segcli", "predict", sources[1], "--out", str(out),
                             "--weights", str(checkpoint), "-q", *flags],
                            cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.monotonic() - started


def test_a_wrong_address_is_one_line_exit_3_and_leaves_nothing(sources, checkpoint, tmp_path):  # noqa: F811
    port = free_port()  # nothing listens there: connection refused
    out = tmp_path / "p.json"
    result, seconds = _predict(sources, out, checkpoint, "--ray-address", f"127.0.0.1:{port}")
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"segcli: error: cannot reach the Ray cluster at 127.0.0.1:{port} (--ray-address): connection refused"]
    assert seconds < 120 and not out.exists() and sorted(tmp_path.iterdir()) == []
    # The same through RAY_ADDRESS (what `ray start` users export), and in Ray Client's form.
    result, _ = _predict(sources, out, checkpoint, "--ray", env={"RAY_ADDRESS": f"ray://127.0.0.1:{port}"})
    assert result.returncode == 3 and result.stderr.strip().splitlines() == [
        f"segcli: error: cannot reach the Ray cluster at ray://127.0.0.1:{port} (RAY_ADDRESS): connection refused"]
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, env, words", [
    (["--ray-address", "nonsense"], {}, "--ray-address 'nonsense': give HOST:PORT"),
    (["--ray-address", "host:port"], {}, "--ray-address 'host:port': give HOST:PORT"),
    (["--ray"], {"SEGCLI_RAY_TIMEOUT": "soon"}, "SEGCLI_RAY_TIMEOUT='soon': give the seconds"),
    (["--ray"], {"SEGCLI_RAY_TIMEOUT": "0"}, "SEGCLI_RAY_TIMEOUT='0': give the seconds"),
])
def test_bad_addresses_and_limits_are_usage_errors(flags, env, words, sources, checkpoint, tmp_path):  # noqa: F811
    result, _ = _predict(sources, tmp_path / "p.json", checkpoint, *flags, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"segcli: error: {words}"), lines
    assert sorted(tmp_path.iterdir()) == []


def test_a_port_that_never_answers_as_ray_ends_at_the_limit(sources, checkpoint, tmp_path):  # noqa: F811
    """TCP accepts (the probe passes) but nothing speaks Ray's protocol: ray.init would retry for
    ever; SEGCLI_RAY_TIMEOUT bounds it."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    port = silent.getsockname()[1]
    try:
        result, seconds = _predict(sources, tmp_path / "p.json", checkpoint, "--ray-address", f"127.0.0.1:{port}",
                                   env={"SEGCLI_RAY_TIMEOUT": "5"}, timeout=180)
    finally:
        silent.close()
    assert result.returncode == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"segcli: error: the Ray cluster at 127.0.0.1:{port} (--ray-address) did not answer within 5 s "
                    "(SEGCLI_RAY_TIMEOUT sets the limit)")
    assert "Traceback" not in result.stderr and seconds < 150
    assert not (tmp_path / "p.json").exists()


def _actor_pids() -> list[int]:
    """Ray worker processes running segcli's actor (Ray names the process after the actor)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"PredictActor" in command:
                pids.append(int(entry.name))
    return sorted(pids)


def test_an_actor_killed_mid_run_is_restarted_and_the_output_is_the_same(  # noqa: F811
        cluster, sources, checkpoint, one_run, tmp_path):  # noqa: F811
    out = tmp_path / "ray.json"
    journal = tmp_path / ".ray.json.segcli" / "journal.jsonl"
    killed: list[int] = []

    def kill_one_actor_after_the_first_result():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if journal.exists() and b'"done"' in journal.read_bytes() and (pids := _actor_pids()):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_actor_after_the_first_result, daemon=True)
    killer.start()
    summary = run_predict(options(sources, out, checkpoint, ray="", ray_actors=2))
    killer.join(5)
    assert killed, "no actor was killed: the run ended first"
    assert summary.images == 5 and [path for path, _ in summary.failures] == [sources[2] + "/broken.jpg"]
    assert out.read_bytes() == one_run("coco").read_bytes()
