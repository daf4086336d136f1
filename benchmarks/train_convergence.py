"""Training speed and convergence: segcli's training step against torchvision's own Mask R-CNN
training step, same initial weights, same batches, same schedule, in one run.

    python benchmarks/train_convergence.py [--arch maskrcnn_resnet18_fpn_small] [--iterations 200]
        [--train-images 200] [--val-images 40] [--size 256] [--batch-size 4] [--device cpu]

Both train the same architecture (segcli's state-dict layout is torchvision's) from one seeded
initialization on a synthetic shapes set (examples/synthetic_shapes.py), seeing identical batches
(images, flips) with SGD, warmup and cosine decay, for the same number of iterations. Both models
are then scored by the same code (segcli's inference and pycocotools' COCO evaluation on a
held-out set), so the mask AP compares what the two training steps learned, and images/s what they
cost. The recipe settings are set equal on both sides: 2000/2000 RPN proposals before/after NMS,
256 anchors at 1:1, `--rois` RoIs per image at 1:3.

Measured on the 2-core CPU (AMD EPYC, fp32, 2 threads, nothing else running), defaults:
segcli 1.54 images/s, mask AP 0.035, box AP 0.027; torchvision 1.07 images/s, mask AP 0.030,
box AP 0.026: 1.45x the speed at equal AP. 200 iterations from scratch is a short budget, so
both APs are low; the profile's difference is RoIAlign's backward (torchvision's CPU kernel is
about a quarter of its step; segcli's embedding_bag gradient about 5%). Rerun after the mask loss
switched to own-class logits only: segcli 1.54 images/s, mask AP 0.035, box AP 0.029; torchvision
1.01, 0.030, 0.026 (1.52x). At 256 px the all-class logits were too small a share to show.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import torchvision_model  # noqa: E402
from segcli.data.coco import load_coco  # noqa: E402
from segcli.data.train_samples import Batch, EpochBatches, TrainingSet, collate  # noqa: E402
from segcli.train.run import init_class_layers, lr_factor  # noqa: E402
from segcli.train.validate import Validator  # noqa: E402
from segcli.archs import ARCHS  # noqa: E402
from segcli.model.build import build_model  # noqa: E402
from segcli.model.preprocess import ResizePolicy  # noqa: E402
from segcli.model.training import TrainingModel, TrainSettings  # noqa: E402


def generate(out: Path, train_images: int, val_images: int, size: int) -> tuple[Path, Path]:
    spec = importlib.util.spec_from_file_location("synthetic_shapes", ROOT / "examples" / "synthetic_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return (module.generate(out / "train", train_images, size, seed=11),
            module.generate(out / "val", val_images, size, seed=12))


def batches(dataset, args) -> list[Batch]:
    """The exact batches both trainers see, decoded once up front (decoding is not what is timed)."""
    sampler = EpochBatches(len(dataset.images), args.batch_size, [args.size], True, seed=0)
    loader = torch.utils.data.DataLoader(TrainingSet(dataset), batch_sampler=sampler, collate_fn=collate)
    out, epoch = [], 0
    while len(out) < args.iterations:
        sampler.set_epoch(epoch)
        out.extend(loader)
        epoch += 1
    return out[: args.iterations]


def torchvision_inputs(batch: Batch, device: torch.device):
    images, targets = [], []
    for i, (h, w) in enumerate(batch.sizes):
        images.append(batch.images[i, :h, :w].permute(2, 0, 1).to(device, torch.float32) / 255)
        keep = batch.targets.labels[i] > 0
        targets.append({"boxes": batch.targets.boxes[i][keep].to(device), "labels": batch.targets.labels[i][keep].to(device),
                        "masks": batch.targets.masks[i][keep, :h, :w].to(device)})
    return images, targets


def sgd(model: torch.nn.Module, args) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    warmup = args.iterations // 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, args.iterations, warmup, "cosine"))
    return optimizer, scheduler


def train(step, model: torch.nn.Module, data: list[Batch], args) -> float:
    """Run the training loop; returns images/s (data already decoded)."""
    optimizer, scheduler = sgd(model, args)
    model.train()
    torch.manual_seed(1)  # same sampling randomness stream on both sides
    started = time.perf_counter()
    for iteration, batch in enumerate(data, 1):
        loss = step(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if iteration % max(1, args.iterations // 10) == 0:
            print(f"  iteration {iteration}/{args.iterations} loss {float(loss.detach()):.3f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    return sum(len(b.sizes) for b in data) / seconds


def score(state: dict, arch: str, num_classes: int, val, device: torch.device, mapping: list[int]) -> dict:
    model = build_model(arch, num_classes)
    model.load_state_dict(state)
    model = model.to(device).eval()
    return Validator(val).evaluate(model, device, mapping)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="maskrcnn_resnet18_fpn_small", choices=sorted(ARCHS))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--val-images", type=int, default=40)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--rois", type=int, default=512, help="sampled RoIs per image, both sides")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="segcli-train-bench-"))
    train_file, val_file = generate(work, args.train_images, args.val_images, args.size)
    dataset, val = load_coco(train_file), load_coco(val_file)
    data = batches(dataset, args)
    classes = dataset.num_classes
    torch.manual_seed(0)
    initial = build_model(args.arch, classes)
    init_class_layers(initial)
    initial_state = {k: v.clone() for k, v in initial.state_dict().items()}
    print(f"{args.arch}, {args.iterations} iterations x {args.batch_size} images of {args.size} px, "
          f"{len(dataset.images)} training / {len(val.images)} validation images, {device}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    # segcli
    model = build_model(args.arch, classes)
    model.load_state_dict(initial_state)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        model.precision = "bf16"
    segcli_step_model = TrainingModel(model, TrainSettings(roi_batch_per_image=args.rois))
    policy = ResizePolicy(args.size, ARCHS[args.arch].max_size)

    def segcli_step(batch: Batch) -> torch.Tensor:
        b = batch.to(device)
        return sum(segcli_step_model(b.images, b.sizes, b.targets, policy).values())

    print("segcli:", file=sys.stderr)
    segcli_rate = train(segcli_step, model, data, args)
    segcli_scores = score(model.state_dict(), args.arch, classes, val, device, dataset.label_to_category_id)

    # torchvision
    reference = torchvision_model(args.arch, num_classes=classes)
    reference.load_state_dict(initial_state)
    reference.transform.min_size = (args.size,)
    reference.transform.max_size = ARCHS[args.arch].max_size
    reference.rpn._pre_nms_top_n["training"] = 2000
    reference.rpn._post_nms_top_n["training"] = 2000
    reference.roi_heads.fg_bg_sampler.batch_size_per_image = args.rois
    reference = reference.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def reference_step(batch: Batch) -> torch.Tensor:
        images, targets = torchvision_inputs(batch, device)
        if autocast is not None:
            with autocast:
                return sum(reference(images, targets).values())
        return sum(reference(images, targets).values())

    print("torchvision:", file=sys.stderr)
    reference_rate = train(reference_step, reference, data, args)
    reference_scores = score(reference.state_dict(), args.arch, classes, val, device, dataset.label_to_category_id)

    print(f"\n{'':12} {'images/s':>9} {'mask AP':>8} {'box AP':>7}")
    print(f"{'torchvision':12} {reference_rate:9.2f} {reference_scores['segm_AP']:8.3f} {reference_scores['bbox_AP']:7.3f}")
    print(f"{'segcli':12} {segcli_rate:9.2f} {segcli_scores['segm_AP']:8.3f} {segcli_scores['bbox_AP']:7.3f}")
    print(f"speed ratio segcli/torchvision: {segcli_rate / reference_rate:.2f}x; "
          f"mask AP difference: {segcli_scores['segm_AP'] - reference_scores['segm_AP']:+.3f}")


if __name__ == "__main__":
    main()
