"""`segcli train` side by side with a loop that follows torchvision's references/detection recipe.

    python benchmarks/train_vs_reference.py --quick            # ~2 minutes on 2 cores
    python benchmarks/train_vs_reference.py [--sets fruits_nuts,coco_tiny] [--seeds 0,1,2] [--epochs 6]
        [--train-images N] [--held-out N] [--weights W] [--batch-size 2] [--workers N] [--plots DIR]

Both sides train the same architecture (torchvision's MaskRCNN built in segcli's state-dict
layout: benchmarks/common.py::torchvision_model) from the same initial weights (the demo
checkpoint, or --weights, with the class-specific layers re-initialized under the seed exactly as
`segcli train` does), on the same images, the same number of epochs (so the same images seen),
with the same seed, batch size, base learning rate, image size and number of loader workers.

- segcli: the real command, `python -m segcli train ... --val-coco HELD_OUT`, its own recipe
  (step schedule at 2/3 and 8/9, warmup a tenth of training, flips, BatchNorm frozen as when
  fine-tuning), one size (the architecture's) on both sides so that images/s compares trainers.
- reference: torchvision's references/detection loop, written out here: a COCO dataset of PIL
  images with pycocotools masks (crowd regions dropped), RandomHorizontalFlip(0.5), a shuffling
  loader, SGD (momentum 0.9, weight decay 1e-4), linear warm-up over min(1000, iterations of an
  epoch - 1) in the first epoch from 1/1000, MultiStepLR x0.1 at 16/26 and 22/26 of the epochs
  (the reference's 26-epoch schedule, scaled), BatchNorm kept frozen (torchvision's own trained
  models freeze it too).

After every epoch each side's weights are scored on held-out images by the same code (segcli's
Validator: segcli's inference, pycocotools' COCO evaluation): mask and box AP against images seen
and against training seconds (validation is not counted), and images/s over the training loop.
The table gives the mean over seeds with the spread (min..max); with --plots, AP curves as PNG.

coco_tiny is scored on its person category by default (--coco-tiny-categories; 'all' for the 80):
the one with enough instances to learn from (81 in 17 training images, 27 in the 6 held out).
--segcli-variants runs several `segcli train` settings per seed against the same reference run.

Measured (the whole table: benchmarks/results/train_vs_reference/), AMD EPYC, 2 cores, AVX-512
BF16, no AMX, torch 2.14.1, 2 threads, quiet machine, 17 min:

    python benchmarks/train_vs_reference.py --seeds 0,1,2 --epochs 8 --workers 1 --threads 2 \
        --segcli-variants "fp32:--precision fp32;bf16:--precision bf16"

    set          trainer      images                mask AP                 box AP             images/s
    fruits_nuts  reference       112   0.322 (0.300..0.350)   0.206 (0.174..0.240)    1.56 (1.54..1.60)
    fruits_nuts  segcli fp32     112   0.321 (0.300..0.342)   0.214 (0.190..0.239)    2.13 (2.04..2.21)
    fruits_nuts  segcli bf16     112   0.318 (0.303..0.346)   0.219 (0.196..0.254)    3.36 (3.33..3.40)
    fruits_nuts  segcli bf16/reference images/s: 2.15x (per seed 2.08, 2.21, 2.15)
    coco_tiny    reference       136   0.002 (0.000..0.003)   0.005 (0.003..0.009)    2.51 (2.39..2.60)
    coco_tiny    segcli fp32     136   0.000 (0.000..0.000)   0.001 (0.000..0.001)    3.71 (3.68..3.74)
    coco_tiny    segcli bf16     136   0.000 (0.000..0.001)   0.001 (0.000..0.002)    5.50 (4.78..5.98)
    coco_tiny    segcli bf16/reference images/s: 2.19x (per seed 2.27, 1.84, 2.50)

From a shapes model, 136 images teach neither trainer COCO people: coco_tiny's AP is noise at zero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import torchvision_model  # noqa: E402
from segcli.archs import ARCHS  # noqa: E402
from segcli.data.coco import load_coco  # noqa: E402
from segcli.model.build import build_model  # noqa: E402
from segcli.train.options import TrainOptions  # noqa: E402
from segcli.train.recipe import initial_model  # noqa: E402
from segcli.train.validate import Validator  # noqa: E402
from segcli.weights import save_checkpoint  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DEMO_WEIGHTS = ROOT / "weights" / "maskrcnn_resnet18_fpn_tiny_shapes.pt"
SETS = {  # name: (train annotations, train images, held-out annotations or None (split the train file), images)
    "fruits_nuts": (DATA / "fruits_nuts" / "annotations.json", DATA / "fruits_nuts" / "images", None, None),
    "coco_tiny": (DATA / "coco_tiny" / "annotations" / "instances_train2017.json", DATA / "coco_tiny" / "images" / "train2017",
                  DATA / "coco_tiny" / "annotations" / "instances_val2017.json", DATA / "coco_tiny" / "images" / "val2017"),
}


def cpu_line() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def subset(data: dict, ids: list[int], path: Path) -> Path:
    """A COCO file of the images `ids` (file names stay relative to the set's images folder)."""
    keep = set(ids)
    out = {"images": [i for i in data["images"] if i["id"] in keep],
           "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
           "categories": data["categories"]}
    path.write_text(json.dumps(out))
    return path


Split = tuple[Path, Path, Path, Path]  # train annotations, their images folder, held-out annotations, theirs


def keep_categories(data: dict, names: list[str] | None) -> dict:
    """The categories named (all when None) and their annotations."""
    if not names:
        return data
    known = {c["name"] for c in data["categories"]}
    if missing := [n for n in names if n not in known]:
        raise SystemExit(f"no category {missing} in the set (it has {sorted(known)})")
    categories = [c for c in data["categories"] if c["name"] in names]
    ids = {c["id"] for c in categories}
    return {**data, "categories": categories, "annotations": [a for a in data["annotations"] if a["category_id"] in ids]}


def split(name: str, train_count: int | None, held_count: int | None, work: Path,
          categories: list[str] | None = None) -> Split:
    train_file, train_images, held_file, held_images = SETS[name]
    data = keep_categories(json.loads(train_file.read_text()), categories)
    ids = sorted(i["id"] for i in data["images"])
    if held_file is None:  # one file: the last images are held out
        held_ids = ids[-(held_count or max(2, len(ids) // 4)):]
        train_ids = [i for i in ids if i not in held_ids]
        held_data, held_images = data, train_images
    else:
        held_data = keep_categories(json.loads(held_file.read_text()), categories)
        held_ids = sorted(i["id"] for i in held_data["images"])[: held_count or None]
        # Training images without an instance of the kept categories are dropped, as the
        # reference's _coco_remove_images_without_annotations does; held-out ones all stay.
        annotated = {a["image_id"] for a in data["annotations"]}
        train_ids = [i for i in ids if i in annotated]
    train_ids = train_ids[: train_count or None]
    return (subset(data, train_ids, work / f"{name}_train.json"), train_images,
            subset(held_data, held_ids, work / f"{name}_held_out.json"), held_images)


def initial_checkpoint(train_file: Path, images: Path, weights: str, seed: int, path: Path) -> tuple[str, dict]:
    """segcli's own fine-tuning initialization under `seed`, saved with the dataset's categories
    (so `segcli train --weights` loads it whole) and returned for the reference."""
    dataset = load_coco(str(train_file), str(images))
    torch.manual_seed(seed)
    model, arch, _ = initial_model(TrainOptions(coco=str(train_file), weights=weights), dataset)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = ARCHS[arch]
    save_checkpoint(path, state, arch, dataset.categories, dataset.label_to_category_id,
                    {"input_size": {"min_size": spec.min_size, "max_size": spec.max_size}})
    return arch, state


class ReferenceCoco(torch.utils.data.Dataset):
    """references/detection's CocoDetection + ConvertCocoPolysToMask + PILToTensor, then the flip."""

    def __init__(self, annotations: Path, images: Path, label_of: dict[int, int]) -> None:
        data = json.loads(annotations.read_text())
        self.folder = images
        self.images = sorted(data["images"], key=lambda i: i["id"])
        self.by_image: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0):
                self.by_image.setdefault(a["image_id"], []).append(a)
        self.label_of = label_of

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        info = self.images[index]
        image = Image.open(self.folder / info["file_name"]).convert("RGB")
        width, height = image.size
        boxes, labels, masks = [], [], []
        for a in self.by_image.get(info["id"], []):
            x, y, w, h = a["bbox"]
            box = [max(0, x), max(0, y), min(width, x + w), min(height, y + h)]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            segmentation = a["segmentation"]
            if isinstance(segmentation, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation.get("counts"), list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = segmentation
            boxes.append(box)
            labels.append(self.label_of[a["category_id"]])
            masks.append(mask_utils.decode(rle))
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64),
                  "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)}
        if torch.rand(1) < 0.5:  # T.RandomHorizontalFlip(0.5)
            tensor = tensor.flip(-1)
            target["boxes"] = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
            target["masks"] = target["masks"].flip(-1)
        return tensor, target


def score(state: dict, arch: str, num_classes: int, validator: Validator, mapping: list[int]) -> dict:
    model = build_model(arch, num_classes)
    model.load_state_dict(state)
    return validator.evaluate(model.eval(), torch.device("cpu"), mapping)


def run_reference(sets: Split, held_out: Validator, arch: str, state: dict, args, seed: int) -> list[dict]:
    train_file, train_images = sets[0], sets[1]
    dataset = load_coco(str(train_file), str(train_images))
    label_of = {cid: label for label, cid in enumerate(dataset.label_to_category_id) if label > 0}
    model = torchvision_model(arch, num_classes=dataset.num_classes)
    model.load_state_dict(state)
    spec = ARCHS[arch]
    model.transform.min_size, model.transform.max_size = (spec.min_size,), spec.max_size
    torch.manual_seed(seed)
    data = ReferenceCoco(train_file, train_images, label_of)
    sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                         collate_fn=lambda batch: tuple(zip(*batch)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    milestones = sorted({max(1, round(args.epochs * f)) for f in (16 / 26, 22 / 26)} - {args.epochs})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    curve, seen, seconds = [], 0, 0.0
    for epoch in range(args.epochs):
        model.train()
        for module in model.modules():  # frozen BatchNorm, as torchvision's trained models and segcli with --weights
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        warmup = None
        if epoch == 0:
            iterations = min(1000, len(loader) - 1)
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / 1000, total_iters=iterations) \
                if iterations > 0 else None
        started = time.perf_counter()
        for images, targets in loader:
            losses = model(list(images), list(targets))
            loss = sum(losses.values())
            value = float(loss.detach())  # the reference reads it every step (loss_value, its NaN check)
            if not math.isfinite(value):
                raise SystemExit(f"reference: the loss became {value}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if warmup is not None:
                warmup.step()
            seen += len(images)
        seconds += time.perf_counter() - started
        scheduler.step()
        scores = score(model.state_dict(), arch, dataset.num_classes, held_out, dataset.label_to_category_id)
        curve.append({"epoch": epoch + 1, "images_seen": seen, "seconds": round(seconds, 2),
                      "mask_AP": scores["segm_AP"], "box_AP": scores["bbox_AP"]})
    return curve


def run_segcli(sets: Split, init: Path, args, seed: int, out: Path, flags: str = "") -> list[dict]:
    train_file, train_images, held_file, held_images = sets
    spec = ARCHS[torch.load(init, weights_only=True)["arch"]]
    extra = [*args.segcli_args.split(), *flags.split()]
    size = [] if "--scale-jitter" in extra else ["--min-size", str(spec.min_size)]  # the two cannot be combined
    command = [sys.executable, "-m", "segcli", "train", "--coco", str(train_file), "--images", str(train_images),
               "--val-coco", str(held_file), "--val-images", str(held_images),
               "--weights", str(init), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--seed", str(seed), "--workers", str(args.workers), "--device", "cpu",
               *size, "--max-size", str(spec.max_size), "--out", str(out), "-q", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
    subprocess.run(command, check=True, env=env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve, seconds, images = [], 0.0, len(json.loads(train_file.read_text())["images"])
    for r in (r for r in records if "seconds" in r):
        seconds += r["seconds"]
        curve.append({"epoch": r["epoch"], "images_seen": images * r["epoch"], "seconds": round(seconds, 2),
                      "mask_AP": r["val_segm_AP"], "box_AP": r["val_bbox_AP"], "step_ms": r.get("step_ms")})
    return curve


def spread(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def plot(results: dict, folder: Path) -> list[Path]:
    from segcli.train.plots import draw_lines, write_png

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sides in results.items():
        for x, label in (("images_seen", "images seen"), ("seconds", "training seconds")):
            series = []
            for side, runs in sides.items():
                epochs = len(runs[0])
                points = [(statistics.fmean(r[e][x] for r in runs), statistics.fmean(r[e]["mask_AP"] for r in runs))
                          for e in range(epochs)]
                series.append((f"{side} mask AP", points))
            top = max((y for _, line in series for _, y in line), default=0.0)
            image = draw_lines(series, f"{name}: held-out mask AP (mean of {len(runs)} seeds)", label, "mask AP",
                               y_max=min(1.0, max(0.05, top * 1.1)))
            paths.append(write_png(image, folder / f"{name}_ap_vs_{x}.png"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 4 training and 2 held-out images per set, 2 seeds")
    parser.add_argument("--sets", default="fruits_nuts,coco_tiny")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-images", type=int, default=None, help="default: all but the held-out ones")
    parser.add_argument("--held-out", type=int, default=None, help="default: a quarter of fruits_nuts, coco_tiny's val")
    parser.add_argument("--weights", default=str(DEMO_WEIGHTS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="default: 0.02 x batch / 16 (both recipes' rule)")
    parser.add_argument("--workers", type=int, default=min(4, max(0, (os.cpu_count() or 1) - 1)))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--segcli-args", default="", help="more `segcli train` flags, e.g. '--freeze-at 2'")
    parser.add_argument("--segcli-variants", default=None,
                        help="several segcli runs per seed, 'NAME:FLAGS;NAME:FLAGS' (e.g. 'fp32:--precision fp32;"
                             "bf16:--precision bf16'), each after --segcli-args; default: one run, 'segcli'")
    parser.add_argument("--coco-tiny-categories", default="person",
                        help="coco_tiny's categories to train and score ('all': its 80; default person, the one "
                             "with enough instances: 81 in 17 training images, 27 held out)")
    parser.add_argument("--plots", default=None, help="folder for AP-curve PNGs")
    parser.add_argument("--json", default=None, help="write every curve here")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_images, args.held_out, args.seeds = 1, 4, 2, "0,1"
    args.lr = args.lr or 0.02 * args.batch_size / 16
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="segcli-train-vs-reference-"))
    print(f"CPU: {cpu_line()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.epochs} epoch(s), batch {args.batch_size}, lr {args.lr:g}, {args.workers} loader worker(s), "
          f"seeds {seeds}, weights {Path(args.weights).name}", file=sys.stderr, flush=True)
    results: dict[str, dict[str, list[list[dict]]]] = {}
    variants = [("segcli", "")] if not args.segcli_variants else \
        [tuple(v.split(":", 1)) if ":" in v else (v, "") for v in args.segcli_variants.split(";")]
    variants = [(n if n.startswith("segcli") else f"segcli {n}", flags) for n, flags in variants]
    for name in args.sets.split(","):
        categories = None if name != "coco_tiny" or args.coco_tiny_categories == "all" \
            else args.coco_tiny_categories.split(",")
        sets = split(name, args.train_images, args.held_out, work, categories)
        held_out = Validator(load_coco(str(sets[2]), str(sets[3])))
        results[name] = {"reference": [], **{side: [] for side, _ in variants}}
        for seed in seeds:
            init = work / f"{name}_init_{seed}.pt"
            arch, state = initial_checkpoint(sets[0], sets[1], args.weights, seed, init)
            start = []  # the curves' first point: the shared initial weights, before any image is seen
            if args.epochs > 1:
                dataset = load_coco(str(sets[0]), str(sets[1]))
                scores = score(state, arch, dataset.num_classes, held_out, dataset.label_to_category_id)
                start = [{"epoch": 0, "images_seen": 0, "seconds": 0.0, "mask_AP": scores["segm_AP"],
                          "box_AP": scores["bbox_AP"]}]
            print(f"{name} seed {seed}: reference...", file=sys.stderr, flush=True)
            results[name]["reference"].append(start + run_reference(sets, held_out, arch, state, args, seed))
            for index, (side, flags) in enumerate(variants):
                print(f"{name} seed {seed}: {side} train...", file=sys.stderr, flush=True)
                results[name][side].append(start + run_segcli(sets, init, args, seed, work / f"{name}_run_{seed}_{index}",
                                                              flags))

    print(f"\nCPU: {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {args.epochs} epoch(s), "
          f"mean over seeds {seeds} (min..max)")
    print(f"{'set':12} {'trainer':12} {'images':>6} {'mask AP':>22} {'box AP':>22} {'images/s':>20}")
    for name, sides in results.items():
        def rates(side: str) -> list[float]:  # each seed's images/s over the whole run
            return [e["images_seen"] / max(e["seconds"], 1e-9) for e in (r[-1] for r in sides[side])]

        for side, runs in sides.items():
            last = [r[-1] for r in runs]
            print(f"{name:12} {side:12} {last[0]['images_seen']:6d} {spread([e['mask_AP'] for e in last]):>22} "
                  f"{spread([e['box_AP'] for e in last]):>22} {spread(rates(side), 2):>20}")
        for side, _ in variants:  # the ratio of means, and each seed's own ratio (same seed, same data)
            per_seed = [s / r for s, r in zip(rates(side), rates("reference"))]
            print(f"{name:12} {side}/reference images/s: {statistics.fmean(rates(side)) / statistics.fmean(rates('reference')):.2f}x"
                  f" (per seed {', '.join(f'{x:.2f}' for x in per_seed)})")
    for side, _ in variants:
        steps = [e["step_ms"] for sides in results.values() for r in sides[side] for e in r if e.get("step_ms")]
        if steps:
            keys = [k for k in steps[0] if k != "total"]
            total = statistics.fmean(s["total"] for s in steps)
            print(f"{side} step time: " + f"{total:.0f} ms/step, " +
                  ", ".join(f"{k} {100 * statistics.fmean(s.get(k, 0) for s in steps) / total:.0f}%" for k in keys))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_line(), "args": vars(args), "results": results}, indent=1))
    if args.plots:
        for path in plot(results, Path(args.plots)):
            print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
