"""Seconds of `segcli eval` against pycocotools run by hand, on the same files, in one process.

    python benchmarks/eval_speed.py [--copies 8] [--per-image 100]

The ground truth is coco_tiny's train file (32 real photos, 80 classes, polygons and crowd RLE)
repeated `--copies` times under new image ids and names; the predictions are its objects with
jittered boxes and eroded masks plus false detections, `--per-image` per image (what a detector
at score 0.05 gives COCO evaluation). Timed, best of --repeat:
  by hand    COCO(gt), loadRes(results file), COCOeval evaluate/accumulate/summarize, segm + bbox
  segcli-1   evaluate_files(gt, results file, workers=1): reading, checks, pairing, the same
             COCOeval in one process, report (segcli's overhead over pycocotools)
  segcli-N   the same with pycocotools' per-image work in N forked processes (--workers, default
             the CPU count)
  segcli-ds  evaluate_files from the COCO dataset file `segcli predict` writes (pairing by
             file_name), default workers (1 on <= 2 cores, else one per 32 images up to the CPUs)
  cli        `python -m segcli eval --gt ... --pred ... --report ...` end to end (process start incl.)
The numbers of all must be identical; the ratios are segcli's seconds over the by-hand seconds,
wall-clock and CPU (this process plus its children: on a busy machine, the steadier of the two),
best of --repeat rounds in which the runs take turns.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segcli.evaluate.run import STAT_NAMES, evaluate_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GT = ROOT.parent / "shared" / "data" / "coco_tiny" / "annotations" / "instances_train2017.json"


def make_inputs(folder: Path, copies: int, per_image: int, seed: int = 0) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(seed)
    base = json.loads(GT.read_text())
    images, annotations = [], []
    for copy_index in range(copies):
        for image in base["images"]:
            new_id = copy_index * 10_000_000 + image["id"]
            images.append({**image, "id": new_id, "file_name": f"copy{copy_index}/{image['file_name']}"})
        for ann in base["annotations"]:
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": copy_index * 10_000_000 + ann["image_id"]})
    gt = {"images": images, "annotations": annotations, "categories": base["categories"]}
    gt_path = folder / "gt.json"
    gt_path.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
    category_ids = coco.getCatIds()
    results = []
    for image_id, image in coco.imgs.items():
        height, width = image["height"], image["width"]
        own = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        for ann in own[:per_image]:
            mask = cv2.erode(coco.annToMask(ann), np.ones((3, 3), np.uint8))
            x, y, w, h = ann["bbox"]
            results.append(_result(image_id, ann["category_id"], rng.uniform(0.05, 1),
                                   [x + rng.normal(0, 2), y + rng.normal(0, 2), w, h], mask))
        for _ in range(per_image - min(len(own), per_image)):
            w, h = rng.uniform(8, width / 3), rng.uniform(8, height / 3)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            mask = np.zeros((height, width), np.uint8)
            mask[int(y):int(y + h), int(x):int(x + w)] = 1
            results.append(_result(image_id, int(rng.choice(category_ids)), rng.uniform(0.05, 0.6), [x, y, w, h], mask))
    results_path = folder / "results.json"
    results_path.write_text(json.dumps(results))
    # The same predictions as `segcli predict` writes them: own ids (reversed order), file names.
    order = sorted(coco.imgs, reverse=True)
    own_id = {gt_id: number for number, gt_id in enumerate(order, start=1)}
    dataset = {"images": [{"id": own_id[i], "file_name": coco.imgs[i]["file_name"], "width": coco.imgs[i]["width"],
                           "height": coco.imgs[i]["height"]} for i in order],
               "categories": base["categories"],
               "annotations": [{**r, "id": n, "image_id": own_id[r["image_id"]], "iscrowd": 0}
                               for n, r in enumerate(results, start=1)]}
    dataset_path = folder / "preds.json"
    dataset_path.write_text(json.dumps(dataset))
    return gt_path, results_path, dataset_path


def _result(image_id: int, category_id: int, score: float, box: list[float], mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"image_id": image_id, "category_id": category_id, "score": round(float(score), 5),
            "bbox": [round(float(v), 2) for v in box], "segmentation": {"size": [int(s) for s in rle["size"]],
                                                                       "counts": rle["counts"].decode("ascii")}}


def by_hand(gt_path: Path, results_path: Path) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        detections = gt.loadRes(str(results_path))
        stats = {}
        for iou_type in ("segm", "bbox"):
            evaluator = COCOeval(gt, detections, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats[iou_type] = [float(v) for v in evaluator.stats]
    return stats


def timed_rounds(runs: dict, repeat: int) -> tuple[dict, dict, dict]:
    """Best wall and CPU seconds (this process and its finished children) of each run, and its value.

    The runs take turns, round after round, so that a load change on a shared machine hits all of
    them alike; CPU seconds are the steadier measure there (other jobs stretch wall time)."""
    wall = {name: float("inf") for name in runs}
    cpu = dict(wall)
    values: dict = {}
    for _ in range(repeat):
        for name, function in runs.items():
            started, cpu_started = time.perf_counter(), _cpu()
            values[name] = function()
            wall[name] = min(wall[name], time.perf_counter() - started)
            cpu[name] = min(cpu[name], _cpu() - cpu_started)
    return wall, cpu, values


def _cpu() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="processes of the forked row (0: the CPU count, >= 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        gt_path, results_path, dataset_path = make_inputs(Path(folder), args.copies, args.per_image)
        report_path = Path(folder) / "report.json"
        command = [sys.executable, "-m", "segcli", "eval", "--gt", str(gt_path), "--pred", str(results_path),
                   "--report", str(report_path), "--quiet"]
        forked = args.workers or max(2, os.cpu_count() or 1)
        runs = {
            "by hand": lambda: by_hand(gt_path, results_path),
            "segcli-1": lambda: evaluate_files(gt_path, results_path, workers=1),
            f"segcli-{forked}": lambda: evaluate_files(gt_path, results_path, workers=forked),
            "segcli-ds": lambda: evaluate_files(gt_path, dataset_path),
            "cli": lambda: (subprocess.run(command, check=True, capture_output=True, cwd=ROOT),
                            json.loads(report_path.read_text()))[1],
        }
        times, cpu, values = timed_rounds(runs, args.repeat)
        stats = {name: value if name == "by hand" else {t: [value[t][n] for n in STAT_NAMES] for t in ("segm", "bbox")}
                 for name, value in values.items()}
        images = args.copies * 32
        from segcli.evaluate.parallel import default_workers

        print(f"{images} images, {images * args.per_image} predictions, segm + bbox (best of {args.repeat}); "
              f"default workers here: {default_workers(images)}")
        print(f"{'':10} {'wall s':>7} {'ratio':>6} {'cpu s':>7} {'ratio':>6}  numbers")
        for name in runs:
            same = "identical" if stats[name] == stats["by hand"] else "DIFFERENT"
            print(f"{name:10} {times[name]:7.2f} {times[name] / times['by hand']:6.2f} "
                  f"{cpu[name]:7.2f} {cpu[name] / cpu['by hand']:6.2f}  {same}")
        print(f"segm AP {stats['by hand']['segm'][0]:.4f}, bbox AP {stats['by hand']['bbox'][0]:.4f}")
        if any(stats[name] != stats["by hand"] for name in runs):
            raise SystemExit("numbers differ")


if __name__ == "__main__":
    main()
