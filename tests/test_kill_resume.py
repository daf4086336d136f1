"""SIGKILL at seeded random moments of a `--shard` run, a `--review` run, a `--track` video run and
a torchrun rank, then `--resume`: the outputs are byte-equal to an uninterrupted run, and between
kills an output is absent, whole, or (JSON Lines) a prefix of the uninterrupted run's bytes.

Each run is `segcli predict` as typed (the CLI's `main`), in a process forked from a forkserver
that has already imported torch: a fresh `python -m segcli` costs seconds of imports, which would
make tens of kills too slow for CI, while the fault (SIGKILL of the whole process, at any moment,
mid-write included) is the same. The ranks are what torchrun starts (RANK, WORLD_SIZE, MASTER_*
in the environment, gloo); when one is killed the others are killed too, as torchrun's launcher
does.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from segcli.predict.shards import record_path
from tests.conftest import SHARED_DATA, free_port, require
from tests.test_predict_cli import photos  # noqa: F401  (fixture)
from tests.test_resume import checkpoint, make_images  # noqa: F401  (fixture: the small model at 160 px)

VIDEO = SHARED_DATA / "videos" / "again.mkv"  # 78 frames, 640x480
SEED = 22
COMMON = ["--precision", "fp32", "--score-thr", "0.05", "--max-det", "5", "--workers", "0", "-q"]


def _cli(argv: list[str], env: dict[str, str], log: str) -> None:
    """A forkserver child: `segcli ARGV` with stdout and stderr into `log`."""
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)  # every run alike: CPU float sums depend on the thread count
    sys.argv = ["segcli", *argv]
    from segcli.cli import main

    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchvision", "segcli.cli", "segcli.predict.run",
                                    "segcli.model.build", "tests.test_kill_resume"])
    warm = context.Process(target=_noop)  # starts the server: its imports stay out of every timing
    warm.start()
    warm.join(300)
    return context


def _noop() -> None:
    pass


@dataclass
class Case:
    """One kind of run: its arguments, the files compared with the uninterrupted run, its ranks."""
    name: str
    argv: list[str]
    outputs: list[Path]
    ranks: int = 1
    logs: list[Path] = field(default_factory=list)

    def start(self, context, resume: bool, log: Path) -> list:
        argv = [*self.argv, *(["--resume"] if resume else [])]
        port = free_port()
        processes = []
        for rank in range(self.ranks):
            env = {"OMP_NUM_THREADS": "1"}
            if self.ranks > 1:
                env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(self.ranks),
                        "LOCAL_WORLD_SIZE": str(self.ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            process = context.Process(target=_cli, args=(argv, env, str(log)))
            process.start()
            processes.append(process)
        self.logs.append(log)
        return processes


def _wait(processes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    return all(process.exitcode is not None for process in processes)


def _check_between_kills(case: Case, reference: dict[Path, bytes]) -> None:
    """After a kill: every output absent, whole, or (a stream) a prefix of the whole."""
    for path in case.outputs:
        if not path.exists():
            continue
        data, whole = path.read_bytes(), reference[path]
        if path.suffix == ".jsonl":
            assert whole.startswith(data), f"{case.name}: {path.name} is not a prefix of the uninterrupted run"
        else:
            assert data == whole, f"{case.name}: {path.name} exists but is not the whole output"


def _stray_files(folder: Path, expected: set[str]) -> list[str]:
    """Files beside the outputs that an uninterrupted run does not leave (temporary files)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in expected)


def kill_and_resume(case: Case, context, kills: int, rng: random.Random, workdir: Path) -> dict[str, int]:
    """The uninterrupted run, then episodes of (start, SIGKILL at a random moment, --resume ...) until
    `kills` kills have landed; every episode ends with a run that completes, compared byte for byte."""
    folder = case.outputs[0].parent
    started = time.monotonic()
    assert _wait(case.start(context, False, workdir / "ref.log"), 300), f"{case.name}: reference run hung"
    horizon = time.monotonic() - started
    reference = {path: path.read_bytes() for path in case.outputs}
    expected = {p.name for p in folder.iterdir()}
    saved = workdir / "reference"
    saved.mkdir()
    for path in case.outputs:
        path.rename(saved / path.name)
    for state in folder.glob(".*.segcli"):
        shutil.rmtree(state)
    for ranks in folder.glob(".*.ranks"):
        shutil.rmtree(ranks)

    landed = episodes = runs = 0
    while landed < kills:
        episodes += 1
        resume, bound = False, 1.2 * horizon
        while True:  # one episode: kill until a run completes
            runs += 1
            log = workdir / f"run{runs}.log"
            processes = case.start(context, resume, log)
            # Up to 1.2x the uninterrupted run: most kills land; the bound grows with each kill of an
            # episode, so that every episode ends however slow the machine is at the moment (a
            # --resume run redoes an interrupted video whole, so it can take as long as the first).
            if _wait(processes, rng.uniform(0.0, bound)):
                break
            bound *= 1.25
            victim = rng.randrange(len(processes))
            os.kill(processes[victim].pid, signal.SIGKILL)
            for process in processes:  # torchrun's launcher stops the other ranks
                if process.exitcode is None:
                    os.kill(process.pid, signal.SIGKILL)
            assert _wait(processes, 60)
            if processes[victim].exitcode == -signal.SIGKILL:
                landed += 1
            _check_between_kills(case, reference)
            resume = True
        codes = [process.exitcode for process in processes]
        text = log.read_text(errors="replace")
        assert codes == [0] * case.ranks and "Traceback" not in text, f"{case.name}: {codes}\n{text[-3000:]}"
        for path in case.outputs:
            assert path.read_bytes() == reference[path], f"{case.name}: {path.name} differs after {runs} runs"
        assert _stray_files(folder, expected) == [], f"{case.name}: files left behind"
        for path in case.outputs:  # the next episode starts from nothing
            path.unlink()
        for state in [*folder.glob(".*.segcli"), *folder.glob(".*.ranks")]:
            shutil.rmtree(state)
    return {"kills": landed, "episodes": episodes, "runs": runs}


@pytest.fixture(scope="module")
def images(photos, tmp_path_factory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("kill") / "photos"
    make_images(folder, photos, [f"img{k}.jpg" for k in range(8)])
    return folder


def _case(name: str, tmp_path: Path, images: Path, checkpoint: Path) -> Case:  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    weights = ["--weights", str(checkpoint), *COMMON]
    if name == "shard":
        part = out / "part-1.json"
        return Case(name, ["predict", str(images), "--shard", "1/2", "--out", str(part), *weights],
                    [part, record_path(part)])
    if name == "review":
        return Case(name, ["predict", str(images), "--out", str(out / "p.json"), "--review", str(out / "queue.csv"),
                           *weights], [out / "p.json", out / "queue.csv"])
    if name == "track":
        videos = tmp_path / "videos"
        videos.mkdir()
        for k in range(2):  # two videos: --resume keeps the one finished and redoes the other whole
            os.symlink(require(VIDEO), videos / f"v{k}.mkv")
        return Case(name, ["predict", str(videos), "--out", str(out / "t.jsonl"), "--track", "--track-low-thr", "0.05",
                           "--vid-stride", "8", *weights], [out / "t.jsonl"])
    if name == "overlay":  # the overlay videos beside the JSON Lines: half-written ones must not stay
        videos = tmp_path / "videos"
        videos.mkdir()
        for k in range(2):
            os.symlink(require(VIDEO), videos / f"v{k}.mkv")
        return Case(name, ["predict", str(videos), "--out", str(out / "t.jsonl"), "--overlay", str(out),
                           "--vid-stride", "8", *weights], [out / "t.jsonl"])
    assert name == "rank"
    return Case(name, ["predict", str(images), "--out", str(out / "ddp.json"), *weights], [out / "ddp.json"], ranks=2)


# Kills per case: fewer for the ranks (gloo start-up) and overlays.
KILLS = {"shard": 8, "review": 8, "track": 8, "rank": 4, "overlay": 4}  # 32 seeded kills: CI's 30 minutes


@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_bytes(name, forkserver, images, checkpoint,  # noqa: F811
                                                                    tmp_path):
    case = _case(name, tmp_path, images, checkpoint)
    rng = random.Random(f"{SEED}-{name}")
    tally = kill_and_resume(case, forkserver, KILLS[name], rng, tmp_path)
    print(f"\n{name}: {json.dumps(tally)}", file=sys.stderr)
    assert tally["kills"] >= KILLS[name]


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_rank_killed_under_torchrun_then_resume(forkserver, images, checkpoint, tmp_path):  # noqa: F811
    """The real launcher: SIGKILL of rank 2 once it has finished an input; torchrun stops rank 1
    and fails; the rerun with --resume writes the bytes of one process over every input."""
    case = _case("rank", tmp_path, images, checkpoint)
    case.ranks = 1  # the reference: one process (what torchrun's ranks together must equal)
    assert _wait(case.start(forkserver, False, tmp_path / "ref.log"), 300)
    out = case.outputs[0]
    reference = out.read_bytes()
    out.unlink()
    shutil.rmtree(out.parent / f".{out.name}.segcli")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "segcli", *case.argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = out.parent / f".{out.name}.ranks" / ".part-2-of-2.json.segcli" / "journal.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and launcher.poll() is None:
        if journal.exists() and b'"done"' in journal.read_bytes():
            break
        time.sleep(0.02)
    ranks = _children(launcher.pid)
    assert launcher.poll() is None and len(ranks) == 2, "the ranks finished before the kill"
    rank2 = next(pid for pid in ranks if b"LOCAL_RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(rank2, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode != 0 and not out.exists(), stderr[-3000:]
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert out.read_bytes() == reference
