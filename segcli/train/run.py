"""`segcli train`: a COCO file -> a trained, self-describing checkpoint.

One process, or one per GPU under torchrun (DistributedDataParallel; gloo on CPUs). Rank 0 alone
writes: `last.pt` after every epoch, `best.pt` when validation mask AP improves, `metrics.jsonl`.
`--resume` restores model, optimizer, scheduler, AMP scaler, epoch and random state from
`last.pt`; since every random choice of an epoch derives from (seed, epoch) and the random state
saved at its start, a resumed run ends with the weights of one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from segcli import __version__
from segcli.atomic import atomic_write
from segcli.data.coco import CocoDataset, load_coco
from segcli.data.train_samples import EpochBatches, TrainingSet, collate
from segcli.train.log import TrainDisplay
from segcli.train.validate import Validator
from segcli.distributed import dist_from_env, init_distributed
from segcli.errors import ExitCode, SegcliError, UsageError, WeightsError
from segcli.archs import ARCHS
from segcli.model.build import build_model
from segcli.model.maskrcnn import MaskRCNN
from segcli.model.preprocess import ResizePolicy
from segcli.model.training import TrainingModel, TrainSettings
from segcli.paths_guard import Output, file_inputs, refuse_overwrites
from segcli.text import escaped
from segcli.weights import resolve_weights, save_checkpoint

DEFAULT_ARCH = "maskrcnn_resnet50_fpn_v2"
# Layers whose shape or meaning depends on the categories: re-initialized when fine-tuning on others.
CLASS_SPECIFIC_PREFIXES = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)
CHECKPOINT_LAST, CHECKPOINT_BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"
MIN_SIDE, MAX_SIDE = 32, 8192  # training image sizes (pixels): larger ones would not fit in memory
MAX_WORKERS = 64  # data-loading processes: more only cost memory (each starts at once)


class TrainingDiverged(SegcliError):
    exit_code = ExitCode.SOME_INPUTS_FAILED  # exit 1: the run stopped partway (documented in --help)


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


def same_categories(a: list[dict], b: list[dict]) -> bool:
    return [(c["id"], c["name"]) for c in a] == [(c["id"], c["name"]) for c in b]


def init_class_layers(model: MaskRCNN) -> None:
    """Detectron's initialization of the class-specific output layers: small weights, so that the
    first iterations start from uniform class scores, near-zero box deltas and 0.5 mask
    probabilities. (torchvision's kaiming-initialized mask logits start the mask loss near 3 and
    destabilize training from scratch.)"""
    heads = model.roi_heads
    for layer, std in ((heads.box_predictor.cls_score, 0.01), (heads.box_predictor.bbox_pred, 0.001),
                       (heads.mask_predictor.mask_fcn_logits, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


def initial_model(options: TrainOptions, dataset: CocoDataset) -> tuple[MaskRCNN, str, str]:
    """(model, arch, how it was initialized). From --weights, the category-independent layers are
    reused and the class-specific ones re-initialized unless the categories are the same."""
    if options.weights is None:
        arch = options.arch or DEFAULT_ARCH
        model = build_model(arch, dataset.num_classes)
        init_class_layers(model)
        return model, arch, "random initialization"
    checkpoint = resolve_weights(options.weights, options.arch, progress=False)
    if options.arch is not None and options.arch != checkpoint.arch:
        raise UsageError(f"--weights {options.weights} is a {checkpoint.arch} checkpoint, not --arch {options.arch}")
    model = build_model(checkpoint.arch, dataset.num_classes)
    init_class_layers(model)
    keep_classes = same_categories(checkpoint.categories, dataset.categories) and \
        list(checkpoint.label_to_category_id) == dataset.label_to_category_id
    state = {k: v for k, v in checkpoint.state_dict.items()
             if keep_classes or not k.startswith(CLASS_SPECIFIC_PREFIXES)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"--weights {options.weights} does not fit {checkpoint.arch}: "
                           f"{str(exc).splitlines()[-1].strip()[:300]}") from None
    structural = [k for k in missing if not k.startswith(CLASS_SPECIFIC_PREFIXES)]
    if structural or unexpected:
        raise WeightsError(f"--weights {options.weights} does not fit {checkpoint.arch}: "
                           f"missing {structural[:3]}, unexpected {unexpected[:3]}")
    how = f"{options.weights}" + ("" if keep_classes else " (class-specific layers re-initialized)")
    return model, checkpoint.arch, how


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Train mode, except that BatchNorm keeps its statistics when fine-tuning: batches of a few
    images would replace well-estimated statistics with noisy ones."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def lr_factor(iteration: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at an iteration: linear warmup from 0.001, then decay."""
    if iteration < warmup:
        alpha = iteration / max(1, warmup)
        return 0.001 * (1 - alpha) + alpha
    if schedule == "cosine":
        progress = (iteration - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 0.1 ** sum(iteration >= m for m in (int(total * 2 / 3), int(total * 8 / 9)))


def make_optimizer(model: nn.Module, options: TrainOptions, world_size: int) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if options.optimizer == "adamw":
        lr = options.lr or 1e-4
        wd = 0.05 if options.weight_decay is None else options.weight_decay
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    lr = options.lr or 0.02 * options.batch_size * world_size / 16  # the linear scaling rule
    wd = 1e-4 if options.weight_decay is None else options.weight_decay
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)


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


def run_train(options: TrainOptions, stderr: TextIO | None = None) -> TrainSummary:
    stderr = stderr or sys.stderr
    if options.weights is not None and options.weights.strip().lower() == "none":
        options = replace(options, weights=None)  # `--weights none`: random initialization, said explicitly
    check_options(options)
    refuse_overwrites_of_inputs(options)
    dist = dist_from_env()
    device = init_distributed(dist, options.device)
    # escaped: a file_name from the annotations with a newline in it must not split a line.
    say = (lambda text: print(f"segcli: {escaped(text, backslashes=False)}", file=stderr, flush=True)) \
        if dist.is_main and not options.quiet else (lambda text: None)
    out = Path(options.out)
    last_path = out / CHECKPOINT_LAST
    if last_path.exists() and not options.resume:
        raise UsageError(f"{out} already holds a run ({last_path}); pass --resume to continue it, or another --out")

    dataset = load_coco(options.coco, options.images)
    report_problems(dataset, say)
    validator = None
    if options.val_coco is not None:
        val_set = load_coco(options.val_coco, options.val_images)
        report_problems(val_set, say)
        if not same_categories(val_set.categories, dataset.categories):
            raise UsageError(f"{options.val_coco} has other categories than {options.coco}")
        validator = Validator(val_set) if dist.is_main else None

    resume_state = load_resume_state(last_path) if options.resume and last_path.exists() else None
    if options.resume and resume_state is None:
        say(f"--resume: no {last_path} yet; starting a new run")
    if resume_state is not None:
        arch = resume_state["arch"]
        model = build_model(arch, dataset.num_classes)
        if not same_categories(resume_state["categories"], dataset.categories):
            raise UsageError(f"{last_path} was trained on other categories than {options.coco}")
        model.load_state_dict(resume_state["model"])
        init = f"resumed from {last_path}"
    else:
        torch.manual_seed(options.seed)
        model, arch, init = initial_model(options, dataset)
    freeze_bn = options.freeze_bn if options.freeze_bn is not None else options.weights is not None
    min_sizes = options.min_sizes or default_min_sizes(arch)
    max_size = options.max_size or ARCHS[arch].max_size
    precision = amp_precision(options, device)
    model = model.to(device)
    if device.type == "cuda" or precision != "fp32":
        model = model.to(memory_format=torch.channels_last)
    model.precision = precision
    train_model: nn.Module = TrainingModel(model, TrainSettings(roi_batch_per_image=options.rois_per_image))
    if dist.enabled:
        if device.type == "cuda" and not freeze_bn:
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
            model = train_model.model
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    optimizer = make_optimizer(model, options, dist.world_size)
    batches = EpochBatches(len(dataset.images), options.batch_size, min_sizes, options.flip, options.seed,
                           dist.rank, dist.world_size)
    total = len(batches) * options.epochs
    warmup = options.warmup_iters if options.warmup_iters is not None else min(1000, total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, warmup, options.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start_epoch, best_ap = 0, None
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["training"]["optimizer"])
        scheduler.load_state_dict(resume_state["training"]["scheduler"])
        scaler.load_state_dict(resume_state["training"]["scaler"])
        start_epoch = resume_state["training"]["epoch"] + 1
        best_ap = resume_state["training"].get("best_ap")
    workers = options.workers if options.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(TrainingSet(dataset), batch_sampler=batches, collate_fn=collate,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    say(f"{dataset.summary()}")
    say(f"training {arch} on {device} ({precision}, {dist.world_size} process(es), batch {options.batch_size} each), "
        f"{init}; {options.epochs} epochs x {len(batches)} iterations, sizes {min_sizes}/{max_size}, "
        f"BatchNorm {'frozen' if freeze_bn else 'trained'}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(out / METRICS, start_epoch)
    meta_base = {
        "trained_with": f"segcli {__version__} train", "dataset": str(options.coco), "init": init,
        "input_size": {"min_size": max(min_sizes), "max_size": max_size},
        "settings": {k: v for k, v in asdict(options).items() if k not in ("progress", "quiet")},
    }
    started = time.time()
    iteration = start_epoch * len(batches)
    display = TrainDisplay(total, iteration, dist.is_main and not options.quiet, options.progress, options.log_every, stderr)
    summary_metrics: list[dict] = []
    with display:
        for epoch in range(start_epoch, options.epochs):
            if resume_state is not None and epoch == start_epoch:
                restore_rng(resume_state["training"]["rng"])
            batches.set_epoch(epoch)
            set_train_mode(model, freeze_bn)
            sums: dict[str, torch.Tensor] = {}
            epoch_start, seen = time.time(), 0
            for batch in loader:
                batch = batch.to(device)
                losses = train_model(batch.images, batch.sizes, batch.targets, ResizePolicy(batch.min_size, max_size))
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if options.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                iteration += 1
                seen += len(batch.sizes) * dist.world_size
                for name, value in {**losses, "loss": loss}.items():
                    sums[name] = sums.get(name, 0.0) + value.detach()
                if display.wants(iteration):  # reading the losses waits for the device: only when shown
                    values = {k: float(v.detach()) for k, v in losses.items()}
                    values["loss"] = float(loss.detach())
                    if not all(math.isfinite(v) for v in values.values()):
                        raise TrainingDiverged(f"the loss became {values['loss']} at epoch {epoch + 1}, iteration "
                                               f"{iteration}; lower --lr or set --clip-grad")
                    rate = seen / max(time.time() - epoch_start, 1e-9)
                    line = {"epoch": epoch + 1, "iteration": iteration, "lr": optimizer.param_groups[0]["lr"],
                            **{k: round(v, 5) for k, v in values.items()}, "images_per_s": round(rate, 3)}
                    display.update(iteration, line)
                    if dist.is_main:
                        append_metrics(out / METRICS, line)
            count = max(1, len(batches))
            epoch_losses = {k: float(v) / count for k, v in sums.items()}
            if not all(math.isfinite(v) for v in epoch_losses.values()):
                raise TrainingDiverged(f"the loss became {epoch_losses.get('loss')} in epoch {epoch + 1}; lower --lr or "
                                       "set --clip-grad")
            record = {"epoch": epoch + 1, "iteration": iteration, "lr": optimizer.param_groups[0]["lr"],
                      **{f"train_{k}": round(v, 5) for k, v in epoch_losses.items()},
                      "images_per_s": round(seen / max(time.time() - epoch_start, 1e-9), 3),
                      "seconds": round(time.time() - epoch_start, 2)}
            if dist.is_main:
                if validator is not None:
                    model.eval()
                    scores = validator.evaluate(model, device, dataset.label_to_category_id)
                    record.update({f"val_{k}": v for k, v in scores.items()})
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                meta = dict(meta_base, epoch=epoch + 1, metrics=record)
                training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(), "epoch": epoch, "best_ap": best_ap,
                            # Nothing draws random numbers between epochs, so this is the state the next
                            # epoch starts from: restoring it makes a resumed run continue exactly.
                            "rng": capture_rng()}
                mask_ap = record.get("val_segm_AP")
                improved = mask_ap is not None and (best_ap is None or mask_ap > best_ap)
                if improved:
                    best_ap = training["best_ap"] = mask_ap
                    save_checkpoint(out / CHECKPOINT_BEST, state, arch, dataset.categories,
                                    dataset.label_to_category_id, meta)
                save_checkpoint(last_path, state, arch, dataset.categories, dataset.label_to_category_id, meta,
                                extra={"training": training})
                append_metrics(out / METRICS, record)
                display.epoch_done(record)
            summary_metrics.append(record)
            if dist.enabled:
                torch.distributed.barrier()
    best = out / CHECKPOINT_BEST if best_ap is not None else None
    return TrainSummary(options.epochs, iteration, time.time() - started, last_path, best, best_ap, summary_metrics)


def report_problems(dataset: CocoDataset, say) -> None:
    shown = 20
    for warning in dataset.warnings[:shown]:
        say(f"warning: {dataset.source}: {warning}")
    if len(dataset.warnings) > shown:
        say(f"warning: {dataset.source}: {len(dataset.warnings) - shown} more problems (all skipped)")


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resume_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: say which and why
        raise WeightsError(f"cannot resume from {path}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or "training" not in state or "model" not in state:
        raise WeightsError(f"cannot resume from {path}: it is not a segcli training checkpoint")
    return state


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def trim_metrics(path: Path, start_epoch: int) -> None:
    """On resume, drop lines of epochs that will be trained again (a run killed mid-epoch)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("epoch", 0) <= start_epoch:
                kept.append(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    with atomic_write(path, "w") as handle:
        handle.write("".join(k + "\n" for k in kept))
