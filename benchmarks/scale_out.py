"""Images/s of `segcli predict` in one process against the ways it spreads over processes:
2 shards (two concurrent `--shard K/2` processes + `segcli merge`), torchrun with 2 ranks, and
Ray Data with 2 actors, on the same real photos and weights.

    python benchmarks/scale_out.py [--rounds 3] [--images 8,128] [--arch maskrcnn_resnet18_fpn_small]

Every configuration runs as a user runs it (the CLI in subprocesses, start-up and model loading
included), round by round, interleaved, at two input counts. A line through the two (median)
wall times splits each configuration into a fixed cost (start-up: processes, model loads, Ray's
cluster) and a cost per image; `per-image overhead` is that cost minus one process's. `CPU s/img`
is the CPU time per image of the processes segcli waits for (the work a mechanism adds, whatever
the parallelism); Ray's actors run under Ray's daemons, which it cannot count (n/a).
On a loaded machine start-up times vary by more than the extra images cost: the slopes then
mean nothing, the CPU column and the end-to-end img/s still do.

On a machine with C cores: one process uses C threads (and, as a second baseline, 1); each shard
process and each torchrun rank C/2 (OMP_NUM_THREADS; torchrun's own default is 1); each Ray actor
C/2 CPUs. On 2 shared cores little gain is expected: two processes share the two cores one
process already uses. The 38 photos of coco_tiny are repeated under other names for more inputs.

Outputs are compared too: the parallel runs (same threads per process) must write identical
files; against the one process (other thread count) a rounded coordinate may differ by 0.01 px.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, real_photos, seeded_state_dict  # noqa: E402
from segcli.categories import coco_categories, coco_label_to_category_id  # noqa: E402
from segcli.weights import save_checkpoint  # noqa: E402

CONFIGS = ("1 process", "1 proc 1 thread", "2 shards", "torchrun 2", "ray 2 actors")


def run(command: list[str], threads: int, cwd: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all descendants) of one command; fails loudly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def one_config(name: str, folder: Path, weights: Path, out: Path, cores: int) -> tuple[float, float]:
    segcli = [sys.executable, "-m", "segcli"]
    common = [str(folder), "--weights", str(weights), "--device", "cpu", "-q"]
    half = max(1, cores // 2)
    if name == "1 process":
        return run([*segcli, "predict", *common, "--out", str(out)], cores, out.parent)
    if name == "1 proc 1 thread":
        return run([*segcli, "predict", *common, "--out", str(out)], 1, out.parent)
    if name == "torchrun 2":
        return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "segcli", "predict", *common, "--out", str(out)], half, out.parent)
    if name == "ray 2 actors":
        return run([*segcli, "predict", *common, "--out", str(out), "--ray", "--ray-actors", "2"], half, out.parent)
    # 2 shards: both processes at once, then the merge; the wall time covers all of it.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(half)}
    parts = [out.with_name(f"{out.stem}.part-{k}.json") for k in (1, 2)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    procs = [subprocess.Popen([*segcli, "predict", *common, "--shard", f"{k}/2", "--out", str(part)], env=env,
                              stderr=subprocess.PIPE, text=True) for k, part in zip((1, 2), parts)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"shard failed ({proc.returncode}):\n{err[-3000:]}")
    merged = subprocess.run([*segcli, "merge", *map(str, parts), "--out", str(out), "-q"], env=env,
                            capture_output=True, text=True)
    if merged.returncode != 0:
        raise SystemExit(f"merge failed:\n{merged.stderr}")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", default="8,128", help="the two input counts")
    parser.add_argument("--arch", default="maskrcnn_resnet18_fpn_small")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    small, large = (int(n) for n in args.images.split(","))
    configs = [c.strip() for c in args.configs.split(",")]
    cores = os.cpu_count() or 1
    photos = real_photos(large)
    with tempfile.TemporaryDirectory(prefix="segcli-scale-") as tmp:
        root = Path(tmp)
        weights = root / "weights.pt"
        save_checkpoint(weights, seeded_state_dict(args.arch, photos), args.arch, coco_categories(),
                        coco_label_to_category_id(), {"seed": 0})
        folders = {}
        for count in (small, large):
            folders[count] = root / f"photos-{count}"
            folders[count].mkdir()
            for k in range(count):  # photos repeated under other names: each is an input of its own
                photo = photos[k % len(photos)]
                (folders[count] / f"{k:04d}-{photo.name}").symlink_to(photo)
        walls = {(c, n): [] for c in configs for n in (small, large)}
        cpu = {(c, n): [] for c in configs for n in (small, large)}
        outputs = {}
        for round_index in range(args.rounds):
            for count in (small, large):
                for config in configs:  # interleaved: each round runs every configuration once
                    out = root / f"{config.replace(' ', '_')}-{count}.json"
                    wall, seconds = one_config(config, folders[count], weights, out, cores)
                    walls[config, count].append(wall)
                    cpu[config, count].append(seconds)
                    outputs[config, count] = out.read_bytes()
                    print(f"round {round_index + 1}: {config:>15} {count:3d} images {wall:6.1f} s", file=sys.stderr)
        print(f"\n{args.arch}, {cores} CPU cores, {args.rounds} rounds (medians), {small} and {large} real photos")
        print(f"{'':>15} {'wall ' + str(small):>9} {'wall ' + str(large):>9} {'fixed s':>8} {'s/img':>7} "
              f"{'img/s':>6} {'img/s@' + str(large):>9} {'vs 1':>6} {'overhead ms/img':>16} {'CPU s/img':>10}")
        base = None
        for config in configs:
            w_small, w_large = statistics.median(walls[config, small]), statistics.median(walls[config, large])
            per_image = (w_large - w_small) / (large - small)
            fixed = w_small - per_image * small
            cpu_per_image = (statistics.median(cpu[config, large]) - statistics.median(cpu[config, small])) / (large - small)
            if base is None:
                base = (per_image, large / w_large)
            steady = f"{1 / per_image:6.2f}" if per_image > 0 else f"{'noise':>6}"  # start-up varied more than work
            print(f"{config:>15} {w_small:9.1f} {w_large:9.1f} {fixed:8.1f} {per_image:7.3f} {steady} "
                  f"{large / w_large:9.2f} {(large / w_large) / base[1]:5.2f}x {1000 * (per_image - base[0]):16.0f} "
                  + (f"{'n/a':>10}" if config.startswith("ray") else f"{cpu_per_image:10.3f}"))
        parallel = [c for c in configs if not c.startswith("1 proc")]
        same = all(outputs[c, large] == outputs[parallel[0], large] for c in parallel) if parallel else True
        print(f"\nparallel outputs identical to each other: {'yes' if same else 'NO'}")
        if "1 process" in configs:
            for c in parallel:
                print(f"{c} output == 1 process output ({cores} threads): "
                      f"{'yes' if outputs[c, large] == outputs['1 process', large] else 'no (other thread count)'}")


if __name__ == "__main__":
    main()
