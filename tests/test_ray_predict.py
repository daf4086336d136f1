"""`segcli predict --ray` on a local two-CPU Ray cluster: two actors write the bytes one process
writes; without Ray installed, one line naming the install command and exit code 3.

Ray is in the `dev` extra, so CI runs these (`-m "not ray"` skips them locally)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from segcli.predict.run import run_predict
from tests.conftest import ROOT
from tests.test_predict_cli import photos  # noqa: F401  (fixture)
from tests.test_resume import checkpoint  # noqa: F401  (fixture)
from tests.test_scale_out import one_run, one_thread, options, sources  # noqa: F401  (fixtures)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_two_ray_actors_write_what_one_process_writes(cluster, sources, checkpoint, one_run, tmp_path):  # noqa: F811
    out = tmp_path / "ray.json"
    summary = run_predict(options(sources, out, checkpoint, ray="", ray_actors=2))
    assert summary.images == 5 and summary.frames >= 3
    assert [path for path, _ in summary.failures] == [sources[2] + "/broken.jpg"]
    assert out.read_bytes() == one_run("coco").read_bytes()
    assert cluster.is_initialized()  # a cluster the caller started is left running for it


def test_json_lines_on_stdout_come_in_input_order(cluster, sources, checkpoint, one_run, capfdbinary):  # noqa: F811
    """The video is the first input and the slowest: one actor is still on it while the other
    finishes the photos, whose lines must still wait for the video's."""
    run_predict(options(sources, "-", checkpoint, ray="", ray_actors=2))
    assert capfdbinary.readouterr().out == one_run("jsonl").read_bytes()


def test_without_ray_one_line_naming_the_install_command_exit_3(sources, tmp_path):  # noqa: F811
    blocker = tmp_path / "no_ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(ROOT)])}
    result = subprocess.run([sys.executable, "-m", "segcli", "predict", *sources, "--ray", "--out",
                             str(tmp_path / "p.json"), "--weights", "shapes_demo"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines() == [
        'segcli: error: --ray needs Ray (with Ray Data), which is not installed: pip install "segcli[ray]"']
    assert not Path(tmp_path / "p.json").exists()


def test_ray_actors_without_ray_is_a_usage_error(sources, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from segcli.cli import app

    result = CliRunner().invoke(app, ["predict", *sources, "--ray-actors", "2", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["segcli: error: --ray-actors needs --ray (or --ray-address)"]
