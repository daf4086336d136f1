"""How long `segcli push` and `segcli pull` take against a real Label Studio server, for 100 images.

    python benchmarks/label_studio_loop.py                     # 100 images, 3 rounds
    python benchmarks/label_studio_loop.py --images 200 --rounds 5 --shape brush

Starts `label-studio` (tests/label_studio_server.py: env SEGCLI_LABEL_STUDIO_BIN, PATH or
./.ls-venv) on 127.0.0.1 with a fresh SQLite folder, predicts `--images` synthetic 256 px images
with the shipped demo model once, then per round:
- push: all images, pre-annotated, into a new project (one CLI call, in this process);
- push again: the rerun that finds every image there and adds nothing (the cost of idempotence);
- a person's work, through the API and not timed: every task annotated with its predictions;
- pull: the finished tasks as a COCO file.
Printed: median and spread (min-max) of each step's wall time over the rounds, per image too. The
server shares the 2 cores with segcli: the figures are the loop's, server included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typer.testing import CliRunner  # noqa: E402

from benchmarks.cli_throughput import machine_line  # noqa: E402
from segcli.cli import app  # noqa: E402
from tests.conftest import synthetic_shapes  # noqa: E402
from tests.label_studio_server import TOKEN, label_studio_bin, running_label_studio  # noqa: E402


def invoke(*args: str) -> float:
    start = time.perf_counter()
    result = CliRunner().invoke(app, list(args))
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"segcli {' '.join(args[:1])} failed ({result.exit_code}): {result.output[-800:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", choices=("polygon", "brush"), default="polygon")
    args = parser.parse_args()
    binary = label_studio_bin()
    if binary is None:
        raise SystemExit("label-studio is not installed: python -m venv .ls-venv && .ls-venv/bin/pip install label-studio")
    print(machine_line())
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        synthetic_shapes().generate(root / "set", images=args.images, size=256, seed=1)
        images = root / "set" / "images"
        invoke("predict", str(images), "--weights", "shapes_demo", "--out", str(root / "pred.json"), "-q")
        (root / "ls").mkdir()
        with running_label_studio(binary, root / "ls") as server:
            times: dict[str, list[float]] = {"push": [], "push again": [], "pull": []}
            for round_number in range(args.rounds):
                project = f"bench-{round_number}"
                push = ("push", str(root / "pred.json"), "--label-studio", server.url, "--project", project,
                        "--token", TOKEN, "--images", str(images), "--shape", args.shape, "-q")
                times["push"].append(invoke(*push))
                times["push again"].append(invoke(*push))
                found = server.api("GET", f"/api/projects?title={project}")["results"]
                project_id = next(p["id"] for p in found if p["title"] == project)
                tasks = server.tasks(project_id)
                assert len(tasks) == args.images, (len(tasks), args.images)
                for task in tasks:  # the person: accepts every pre-annotation as it is
                    regions = [{k: v for k, v in r.items() if k != "score"} for r in task["predictions"][0]["result"]]
                    server.api("POST", f"/api/tasks/{task['id']}/annotations", {"result": regions})
                out = root / f"pulled-{round_number}.json"
                times["pull"].append(invoke("pull", "--label-studio", server.url, "--project", project,
                                            "--token", TOKEN, "--out", str(out), "-q"))
                pulled = json.loads(out.read_text())
                assert len(pulled["images"]) == args.images
    print(f"{args.images} images ({args.shape}), {args.rounds} rounds: median (min-max) wall seconds")
    for step, values in times.items():
        median = statistics.median(values)
        print(f"  {step:<11} {median:7.2f} s ({min(values):.2f}-{max(values):.2f})   "
              f"{1000 * median / args.images:6.1f} ms per image")


if __name__ == "__main__":
    main()
