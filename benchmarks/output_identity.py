"""Byte-identity of predict's outputs across two revisions (a refactor must not change a byte).

Runs a fixed set of `segcli predict` / `segcli merge` commands -- every --format, --masks polygon,
--overlay, --track on a video, --review, --slice, --shard + merge, an interrupted-then---resume
run, JSON Lines on stdout -- with the shipped shapes demo model on seeded synthetic inputs, and
prints one sha256 per output file. With --ref REV it also runs the same commands on a checkout of
REV (a temporary git worktree) and compares file by file; exit 1 on any difference.

    python benchmarks/output_identity.py --ref c58c6e0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--weights", "shapes_demo", "--device", "cpu", "--precision", "fp32", "--workers", "0", "-q"]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_inputs(folder: Path) -> None:
    shapes = _example("synthetic_shapes")
    rng = np.random.default_rng(11)
    for name in ("images", "late", "big", "clips"):
        (folder / name).mkdir(parents=True)
    for number in range(5):  # the last two arrive "later", for --resume
        image, _ = shapes.make_image(rng, 256)
        target = folder / ("images" if number < 3 else "late") / f"shape_{number}.png"
        cv2.imwrite(str(target), image[..., ::-1])
    big = np.concatenate([np.concatenate([shapes.make_image(rng, 256)[0] for _ in range(2)], 1) for _ in range(2)], 0)
    cv2.imwrite(str(folder / "big" / "big.png"), big[..., ::-1])
    _example("moving_shapes").generate(folder / "clips" / "shapes.avi", frames=16)


def cases(inputs: Path, out: Path) -> list[tuple[str, list[list[str]]]]:
    """(name, commands): each command is `segcli` arguments; outputs go under out/name."""
    images, clips, big = str(inputs / "images"), str(inputs / "clips" / "shapes.avi"), str(inputs / "big")
    o = lambda name, leaf: str(out / name / leaf)  # noqa: E731
    found = [
        ("coco", [["predict", images, "--out", o("coco", "p.json")]]),
        ("coco-results", [["predict", images, "--format", "coco-results", "--out", o("coco-results", "p.json")]]),
        ("coco-polygon", [["predict", images, "--masks", "polygon", "--out", o("coco-polygon", "p.json")]]),
        ("jsonl", [["predict", images, clips, "--out", o("jsonl", "p.jsonl")]]),
        ("geojson", [["predict", images, "--out", o("geojson", "p.geojson")]]),
        ("labelme", [["predict", images, "--format", "labelme", "--out", o("labelme", "out/")]]),
        ("yolo", [["predict", images, "--format", "yolo", "--out", o("yolo", "out/")]]),
        ("png", [["predict", images, "--format", "png", "--out", o("png", "out/")]]),
        ("overlay", [["predict", images, clips, "--out", o("overlay", "p.json"), "--overlay", o("overlay", "drawn")]]),
        ("track", [["predict", clips, "--track", "--out", o("track", "p.jsonl")]]),
        ("review", [["predict", images, "--review", o("review", "queue.csv"), "--out", o("review", "p.json")]]),
        ("slice", [["predict", big, "--slice", "192", "--out", o("slice", "p.json")]]),
        ("shards", [["predict", images, str(inputs / "late"), "--shard", f"{k}/2", "--out", o("shards", f"part-{k}.json")]
                    for k in (1, 2)] + [["merge", o("shards", "part-1.json"), o("shards", "part-2.json"),
                                         "--out", o("shards", "merged.json")]]),
        ("stdout", [["predict", images]]),
    ]
    return found


def run_tree(tree: Path, inputs: Path, out: Path) -> dict[str, str]:
    """Run every case with the segcli of `tree`; sha256 of each file written (state folders aside)."""
    env = dict(os.environ, PYTHONPATH=str(tree), SEGCLI_CACHE=str(out / "cache"))
    for name, commands in cases(inputs, out):
        (out / name).mkdir(parents=True, exist_ok=True)
        for args in commands:
            done = subprocess.run([sys.executable, "-m", "segcli", *args, *(COMMON if args[0] == "predict" else ["-q"])],
                                  env=env, cwd=tree, capture_output=True)
            if done.returncode not in (0, 1):
                sys.exit(f"{tree}: segcli {' '.join(args)} failed ({done.returncode}): {done.stderr.decode()[-800:]}")
            if name == "stdout":
                (out / name / "stdout.jsonl").write_bytes(done.stdout)
    # --resume: three images, then two more arrive and the run resumes.
    resume = out / "resume"
    staged = resume / "inputs"
    shutil.copytree(inputs / "images", staged)
    for step in range(2):
        if step == 1:
            for path in (inputs / "late").iterdir():
                shutil.copy(path, staged / path.name)
        args = ["predict", str(staged), "--out", str(resume / "p.json"), *(["--resume"] if step else []), *COMMON]
        subprocess.run([sys.executable, "-m", "segcli", *args], env=env, cwd=tree, check=True, capture_output=True)
    shutil.rmtree(staged)
    shutil.rmtree(out / "cache", ignore_errors=True)
    hashes = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(out)
        if any(part.startswith(".") or part.endswith(".segcli") for part in relative.parts):
            continue  # resume state (journal, lock, manifest): not an output
        hashes[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="git revision to compare against (checked out in a temporary worktree)")
    parser.add_argument("--keep", help="keep the outputs in this folder")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="segcli-identity-"))
    inputs = work / "inputs"
    if not inputs.exists():
        make_inputs(inputs)
    trees = {"this": ROOT}
    if args.ref:
        trees["ref"] = work / "ref-tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(trees["ref"]), args.ref], cwd=ROOT, check=True)
    try:
        results = {}
        for label, tree in trees.items():
            shutil.rmtree(work / label, ignore_errors=True)
            results[label] = run_tree(tree, inputs, work / label)
    finally:
        if args.ref:
            subprocess.run(["git", "worktree", "remove", "--force", str(trees["ref"])], cwd=ROOT, check=False)
    this = results["this"]
    print(f"{len(this)} output files from {len(cases(inputs, work))} + 1 cases")
    if "ref" not in results:
        print(json.dumps(this, indent=1))
        return
    ref = results["ref"]
    differ = sorted(name for name in set(this) | set(ref) if this.get(name) != ref.get(name))
    for name in sorted(set(this) | set(ref)):
        mark = "DIFFERS" if name in differ else "same"
        print(f"{mark:8} {(this.get(name) or '-')[:16]} {name}")
    print(f"{len(differ)} of {len(set(this) | set(ref))} files differ from {args.ref}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
