"""Start-up of `segcli predict`: the time before the first result, an older commit against this tree.

    python benchmarks/startup.py [--ref main] [--rounds 5] [--images 5]

Both versions run the same command in fresh processes, round by round in alternating order, on
the same images: `python -m segcli predict IMAGES --weights shapes_demo --device cpu`, JSON Lines
on stdout (the issue's case: 5 images with the demo model). `--ref` is any git revision; its
`segcli/` and `weights/` are extracted into a temporary folder and put first on PYTHONPATH.

Measured per run:
  first result   seconds from starting the process to the first JSON line on stdout
  total          seconds until the process ended
  imports        seconds Python spent importing (`-X importtime`, all top-level imports of the run)
  heavy          import seconds of torch, torchvision, cv2, shapely, pycocotools, rich (self + children)
  CLI alone      seconds of `python -m segcli --version` (the CLI without a subcommand; a
                 usage error for revisions before --version existed, which loads the same code)
Medians over the rounds are printed with the ratio this tree / ref (below 1: faster), then where
the imports that remain go: torch, torchvision on top of it, and torch._dynamo, which
torchvision.ops.roi_align imports (`from torch._dynamo.utils import is_compile_supported`) in
every process that imports torchvision. On a busy machine the figures wander; the ratio of
interleaved runs is the steadier number.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "cv2", "shapely", "pycocotools", "rich")
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def extract(revision: str, folder: Path) -> str:
    """`segcli/` and `weights/` of `revision` into `folder`; returns the commit's short hash."""
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "segcli", "weights"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return commit


def make_images(folder: Path, count: int) -> Path:
    sys.path.insert(0, str(ROOT / "examples"))
    import synthetic_shapes

    synthetic_shapes.generate(folder, images=count, size=256, seed=7)
    return folder / "images"


def timed_predict(source: Path, images: Path, scratch: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-X", "importtime", "-m", "segcli", "predict", str(images), "--weights", "shapes_demo",
               "--device", "cpu"]
    log = scratch / "importtime.txt"
    with open(log, "w") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, cwd=scratch, env=env)
        first = process.stdout.readline()
        first_at = time.perf_counter() - started
        process.stdout.read()
        code = process.wait()
        total = time.perf_counter() - started
    if code != 0 or not first.startswith(b"{"):
        raise SystemExit(f"{source}: segcli predict failed ({code}):\n{log.read_text()[-2000:]}")
    imports, heavy = import_seconds(log.read_text())
    return {"first result": first_at, "total": total, "imports": imports, "heavy": heavy}


def import_seconds(log: str) -> tuple[float, float]:
    """(all top-level imports, the heavy packages' own imports) in seconds, from `-X importtime`."""
    total = heavy = 0.0
    for match in IMPORT_LINE.finditer(log):
        cumulative, depth, name = int(match.group(2)), len(match.group(3)), match.group(4)
        if depth == 1:  # a top-level import of the run (its cumulative time includes its children)
            total += cumulative / 1e6
        if name in HEAVY:
            heavy += cumulative / 1e6  # each package is imported (and timed) once, wherever from
    return total, heavy


def import_breakdown() -> dict[str, float]:
    """Cumulative import seconds of torch, torchvision (given torch) and torch._dynamo inside it."""
    log = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch, torchvision"], capture_output=True,
                         text=True).stderr
    cumulative = {match.group(4): int(match.group(2)) / 1e6 for match in IMPORT_LINE.finditer(log)}
    return {name: cumulative.get(name, 0.0) for name in ("torch", "torchvision", "torch._dynamo")}


def timed_version(source: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(source)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "segcli", "--version"], env=env, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="main", help="git revision to compare with (default: main)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="segcli-startup-") as tmp:
        tmp = Path(tmp)
        (tmp / "ref").mkdir()
        commit = extract(args.ref, tmp / "ref")
        images = make_images(tmp / "data", args.images)
        versions = {f"ref {commit}": tmp / "ref", "this tree": ROOT}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in versions}
        for round_index in range(args.rounds):
            order = list(versions) if round_index % 2 == 0 else list(reversed(versions))
            for name in order:
                figures = timed_predict(versions[name], images, tmp)
                figures["CLI alone"] = timed_version(versions[name])
                results[name].append(figures)
                print(f"round {round_index + 1} {name:>14}: " + ", ".join(f"{k} {v:.2f} s" for k, v in figures.items()),
                      file=sys.stderr)
    ref, new = results.values()
    print(f"\nsegcli predict {args.images} images --weights shapes_demo, {args.rounds} rounds, medians "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')})")
    print(f"{'':<14}{'ref ' + commit:>14}{'this tree':>12}{'ratio':>8}")
    for key in ref[0]:
        before, after = (statistics.median(r[key] for r in runs) for runs in (ref, new))
        print(f"{key:<14}{before:>12.2f} s{after:>10.2f} s{after / before:>8.2f}")
    parts = import_breakdown()
    print(f"\nwhat every predict still imports (one run): torch {parts['torch']:.2f} s, torchvision "
          f"{parts['torchvision']:.2f} s on top, of which torch._dynamo {parts['torch._dynamo']:.2f} s "
          "(pulled in by torchvision.ops.roi_align)")


if __name__ == "__main__":
    main()
