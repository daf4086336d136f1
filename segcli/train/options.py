"""`segcli train`'s settings: the options, their checks, and the defaults that depend on the
architecture or the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from segcli.archs import ARCHS
from segcli.errors import UsageError
from segcli.paths_guard import Output, file_inputs, refuse_overwrites

DEFAULT_ARCH = "maskrcnn_resnet50_fpn_v2"
CHECKPOINT_LAST, CHECKPOINT_BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"
MIN_SIDE, MAX_SIDE = 32, 8192  # training image sizes (pixels): larger ones would not fit in memory
MAX_WORKERS = 64  # data-loading processes: more only cost memory (each starts at once)


@dataclass
class TrainOptions:
    coco: str
    images: str | None = None
    val_coco: str | None = None
    val_images: str | None = None
    weights: str | None = None  # initial weights (registry name, file, URL); None or "none": from scratch
    arch: str | None = None
    epochs: int = 12
    batch_size: int = 2  # per process
    lr: float | None = None  # None: 0.02 x total batch / 16 for SGD, 1e-4 for AdamW
    optimizer: str = "sgd"
    schedule: str = "step"  # step: x0.1 at 2/3 and 8/9 of training; cosine
    warmup_iters: int | None = None  # None: min(1000, a tenth of training)
    weight_decay: float | None = None  # None: 1e-4 for SGD, 0.05 for AdamW
    clip_grad: float | None = None
    amp: bool | None = None  # None: on for CUDA, off on CPUs (bf16 autocast training is slower there)
    workers: int | None = None  # data loader processes; None: min(4, cores - 1)
    device: str = "auto"
    out: str = "runs/train"
    resume: bool = False
    seed: int = 0
    min_sizes: list[int] | None = None  # multi-scale training; None: 80-100% of the arch's size
    max_size: int | None = None
    flip: bool = True
    freeze_bn: bool | None = None  # None: frozen when starting from --weights, trained from scratch
    rois_per_image: int = 512
    log_every: int = 20
    progress: bool | None = None
    quiet: bool = False


@dataclass
class TrainSummary:
    epochs: int
    iterations: int
    seconds: float
    last: Path
    best: Path | None
    best_ap: float | None
    metrics: list[dict] = field(default_factory=list)


def default_min_sizes(arch: str) -> list[int]:
    base = ARCHS[arch].min_size
    return sorted({int(round(base * f / 16)) * 16 for f in (0.8, 0.9, 1.0)})


def check_options(o: TrainOptions) -> None:
    if o.epochs < 1 or o.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be at least 1")
    if o.optimizer not in ("sgd", "adamw"):
        raise UsageError(f"--optimizer {o.optimizer!r}: choose sgd or adamw")
    if o.schedule not in ("step", "cosine"):
        raise UsageError(f"--schedule {o.schedule!r}: choose step or cosine")
    if o.lr is not None and not o.lr > 0:
        raise UsageError(f"--lr must be positive, got {o.lr}")
    if o.arch is not None and o.arch not in ARCHS:
        raise UsageError(f"unknown --arch {o.arch!r}; choose one of {', '.join(ARCHS)}")
    if o.min_sizes is not None and (not o.min_sizes or min(o.min_sizes) < MIN_SIDE or max(o.min_sizes) > MAX_SIDE):
        raise UsageError(f"--min-size values must be {MIN_SIDE} to {MAX_SIDE} pixels")
    if (o.val_images is not None) and o.val_coco is None:
        raise UsageError("--val-images needs --val-coco")
    for flag, value, low, high in (
        ("--max-size", o.max_size, MIN_SIDE, MAX_SIDE), ("--warmup-iters", o.warmup_iters, 0, None),
        ("--rois-per-image", o.rois_per_image, 1, None), ("--workers", o.workers, 0, MAX_WORKERS),
        ("--seed", o.seed, 0, 2**32 - 1), ("--log-every", o.log_every, 1, None),
    ):
        if value is not None and not (low <= value and (high is None or value <= high)):
            bounds = f"{low} to {high}" if high is not None else f"at least {low}"
            raise UsageError(f"{flag} must be {bounds}, got {value}")
    if o.weight_decay is not None and not o.weight_decay >= 0:
        raise UsageError(f"--weight-decay must be 0 or more, got {o.weight_decay}")
    if o.clip_grad is not None and not o.clip_grad > 0:
        raise UsageError(f"--clip-grad must be positive, got {o.clip_grad}")


def amp_precision(options: TrainOptions, device: torch.device) -> str:
    enabled = options.amp if options.amp is not None else device.type == "cuda"
    if not enabled:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def refuse_overwrites_of_inputs(o: TrainOptions) -> None:
    """The run folder and the files in it may not be (or replace) an annotation file or the weights."""
    inputs = file_inputs("--coco", [o.coco]) + file_inputs("--val-coco", [o.val_coco]) + file_inputs("--weights", [o.weights])
    out = Path(o.out)
    files = [Output("--out", out / name, given=o.out) for name in (CHECKPOINT_LAST, CHECKPOINT_BEST, METRICS)]
    refuse_overwrites(inputs, [Output("--out", out, folder=True)], files)
