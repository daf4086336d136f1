"""`segcli train`'s settings: the options, their checks, and the defaults that depend on the
architecture or the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from segcli.archs import ARCHS
from segcli.device import cpu_has_fast_bf16
from segcli.errors import UsageError
from segcli.paths_guard import Output, file_inputs, refuse_overwrites

DEFAULT_ARCH = "maskrcnn_resnet50_fpn_v2"
CHECKPOINT_LAST, CHECKPOINT_BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"
MIN_SIDE, MAX_SIDE = 32, 8192  # training image sizes (pixels): larger ones would not fit in memory
MAX_WORKERS = 64  # data-loading processes: more only cost memory (each starts at once)
FREEZE_AT_MAX = 5  # the stem and the four ResNet stages
JITTER_STEP = 16  # --scale-jitter's short sides: MIN, MIN + 16, ..., MAX
PRECISIONS = ("auto", "fp32", "bf16")
PLOT_FILES = ("loss.png", "ap.png")


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
    amp: bool | None = None  # None: as --precision auto (on for CUDA and for CPUs with bf16 instructions)
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
    freeze_at: int = 0  # detectron2's FREEZE_AT: 1 the stem, 2 also the first ResNet stage, ... 5 the whole ResNet
    scale_jitter: tuple[int, int] | None = None  # (MIN, MAX): each batch's short side from MIN to MAX
    patience: int | None = None  # stop after this many validations without a better mask AP
    plots: str | None = None  # folder for loss.png and ap.png
    precision: str | None = None  # auto, fp32 or bf16; None: as --amp says, else auto


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


def jitter_sizes(low: int, high: int) -> list[int]:
    """--scale-jitter's short sides: MIN to MAX in steps of 16, both ends included."""
    return sorted({*range(low, high + 1, JITTER_STEP), high})


def input_min_size(o: TrainOptions, arch: str, min_sizes: list[int]) -> int:
    """The short side the checkpoint asks predict for: the largest trained one, or with
    --scale-jitter the architecture's own, held within the jitter's range."""
    if o.scale_jitter is not None:
        return min(max(ARCHS[arch].min_size, o.scale_jitter[0]), o.scale_jitter[1])
    return max(min_sizes)


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
    if not 0 <= o.freeze_at <= FREEZE_AT_MAX:
        raise UsageError(f"--freeze-at must be 0 (train all) to {FREEZE_AT_MAX} (the whole ResNet), got {o.freeze_at}")
    if o.scale_jitter is not None:
        low, high = o.scale_jitter
        if not MIN_SIDE <= low <= high <= MAX_SIDE:
            raise UsageError(f"--scale-jitter {low},{high}: give MIN,MAX with {MIN_SIDE} <= MIN <= MAX <= {MAX_SIDE} pixels")
        if o.min_sizes is not None:
            raise UsageError("--scale-jitter and --min-size both set the training sizes; give one")
    if o.patience is not None:
        if o.patience < 1:
            raise UsageError(f"--patience must be at least 1 validation, got {o.patience}")
        if o.val_coco is None:
            raise UsageError("--patience needs --val-coco (it counts validations without a better mask AP)")
    if o.plots is not None and not o.plots.strip():
        raise UsageError("--plots needs a folder name")
    if o.precision is not None:
        if o.precision not in PRECISIONS:
            raise UsageError(f"--precision {o.precision!r}: choose {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
        if o.amp is not None:
            raise UsageError("--precision and --amp/--no-amp both set the precision; give one")


def amp_precision(options: TrainOptions, device: torch.device) -> str:
    """fp32, bf16 or fp16 (CUDA without bf16). auto (the default) is mixed precision on CUDA and
    bf16 on CPUs with bf16 instructions (AVX-512 BF16, AMX), where it measured 1.5x fp32's
    images/s at the same held-out AP (benchmarks/train_vs_reference.py); fp32 elsewhere.
    bf16 asked for on a CPU without those instructions is refused: there autocast emulates it,
    slower than fp32 and less accurate, so it can only be a mistake (the user asked for speed)."""
    if options.precision not in (None, "auto"):
        precision = options.precision
        flag = f"--precision {precision}"
    else:
        enabled = options.amp if options.amp is not None else device.type == "cuda" or cpu_has_fast_bf16()
        if not enabled:
            return "fp32"
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        precision, flag = "bf16", "--amp (bf16 on a CPU)"
    if not runs_natively(precision, device):
        if device.type == "cuda":
            raise UsageError(f"{flag}: this GPU has no bfloat16; use --amp (float16) or --precision fp32")
        raise UsageError(f"{flag}: this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX), so bf16 would be "
                         "emulated, slower than fp32; train in fp32 here")
    return precision


def runs_natively(precision: str, device: torch.device) -> bool:
    """Whether `device` has the arithmetic `precision` needs (bf16 emulated on a CPU does not count)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    return precision == "bf16" and cpu_has_fast_bf16()


def resumed_precision(options: TrainOptions, device: torch.device, chosen: str, trained: str | None) -> tuple[str, str | None]:
    """--resume continues in the precision the run trained in (its `last.pt` says which), unless
    --precision or --amp/--no-amp asks for one, or this device cannot run it. Returns the
    precision and, when it is not `chosen` or the run's own, the line that says why."""
    asked = options.precision not in (None, "auto") or options.amp is not None
    if trained is None or trained == chosen or asked:
        return chosen, None
    if runs_natively(trained, device):
        return trained, f"--resume: continuing in {trained}, the precision the run trained in"
    return chosen, f"--resume: the run trained in {trained}, which this {device.type} cannot run fast; continuing in {chosen}"


def refuse_overwrites_of_inputs(o: TrainOptions) -> None:
    """The run folder and the files in it may not be (or replace) an annotation file or the weights."""
    inputs = file_inputs("--coco", [o.coco]) + file_inputs("--val-coco", [o.val_coco]) + file_inputs("--weights", [o.weights])
    out = Path(o.out)
    files = [Output("--out", out / name, given=o.out) for name in (CHECKPOINT_LAST, CHECKPOINT_BEST, METRICS)]
    folders = [Output("--out", out, folder=True)]
    if o.plots is not None:
        folders.append(Output("--plots", Path(o.plots), folder=True))
        files += [Output("--plots", Path(o.plots) / name, given=o.plots) for name in PLOT_FILES]
    refuse_overwrites(inputs, folders, files)
