"""`segcli train`: a COCO file -> a trained, self-describing checkpoint.

One process, or one per GPU under torchrun (DistributedDataParallel; gloo on CPUs). Rank 0 alone
writes: `last.pt` after every epoch, `best.pt` when validation mask AP improves, `metrics.jsonl`.
`--resume` restores model, optimizer, scheduler, AMP scaler, epoch and random state from
`last.pt`; since every random choice of an epoch derives from (seed, epoch) and the random state
saved at its start, a resumed run ends with the weights of one that was never interrupted.

The pieces: `options.py` (the flags' checks and defaults), `recipe.py` (initial model, optimizer,
schedule), `loop.py` (an epoch's steps), `checkpoints.py` (last.pt, best.pt, metrics.jsonl),
`validate.py` (validation AP), `log.py` (what is shown on stderr).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from segcli import __version__
from segcli.archs import ARCHS
from segcli.data.coco import CocoDataset, load_coco
from segcli.data.train_samples import EpochBatches, TrainingSet, collate
from segcli.distributed import dist_from_env, init_distributed, leave_distributed
from segcli.errors import UsageError
from segcli.model.build import build_model
from segcli.model.training import TrainingModel, TrainSettings
from segcli.text import escaped
from segcli.train.checkpoints import (
    append_metrics, capture_rng, load_resume_state, restore_rng, trim_metrics,
)
from segcli.train.log import TrainDisplay
from segcli.train.loop import Steps, TrainingDiverged, train_epoch
from segcli.train.options import (
    CHECKPOINT_BEST, CHECKPOINT_LAST, METRICS, TrainOptions, TrainSummary, amp_precision, check_options,
    default_min_sizes, input_min_size, jitter_sizes, refuse_overwrites_of_inputs, resumed_precision,
)
from segcli.train.plots import read_metrics, write_training_plots
from segcli.train.recipe import (
    freeze_stages, init_class_layers, initial_model, lr_factor, make_optimizer, same_categories, set_train_mode,
)
from segcli.train.validate import Validator
from segcli.weights import save_checkpoint

# Names the tests, benchmarks and the command import from here.
__all__ = ["TrainOptions", "TrainSummary", "TrainingDiverged", "init_class_layers", "lr_factor", "run_train"]


def run_train(options: TrainOptions, stderr: TextIO | None = None) -> TrainSummary:
    stderr = stderr or sys.stderr
    if options.weights is not None and options.weights.strip().lower() == "none":
        options = replace(options, weights=None)  # `--weights none`: random initialization, said explicitly
    check_options(options)
    refuse_overwrites_of_inputs(options)
    dist = dist_from_env()
    device = init_distributed(dist, options.device)
    precision = amp_precision(options, device)  # before any work: bf16 on a CPU without it is refused
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
        precision, why = resumed_precision(options, device, precision, resume_state["training"].get("precision"))
        if why:
            say(why)
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
    if options.scale_jitter is not None:
        min_sizes = jitter_sizes(*options.scale_jitter)
    else:
        min_sizes = options.min_sizes or default_min_sizes(arch)
    frozen = freeze_stages(model, options.freeze_at)
    max_size = options.max_size or ARCHS[arch].max_size
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
    start_epoch, best_ap, since_best = 0, None, 0
    if resume_state is not None:
        trained_at = resume_state["training"].get("freeze_at", 0)
        if trained_at != options.freeze_at:  # other parameters train: the optimizer state would not fit
            raise UsageError(f"{last_path} was trained with --freeze-at {trained_at}; resume it with the same")
        optimizer.load_state_dict(resume_state["training"]["optimizer"])
        scheduler.load_state_dict(resume_state["training"]["scheduler"])
        scaler.load_state_dict(resume_state["training"]["scaler"])
        start_epoch = resume_state["training"]["epoch"] + 1
        best_ap = resume_state["training"].get("best_ap")
        since_best = resume_state["training"].get("since_best", 0)
    workers = options.workers if options.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(TrainingSet(dataset), batch_sampler=batches, collate_fn=collate,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    say(f"{dataset.summary()}")
    say(f"training {arch} on {device} ({precision}, {dist.world_size} process(es), batch {options.batch_size} each), "
        f"{init}; {options.epochs} epochs x {len(batches)} iterations, sizes {min_sizes}/{max_size}, "
        f"BatchNorm {'frozen' if freeze_bn else 'trained'}"
        + (f", --freeze-at {options.freeze_at} ({frozen:,} parameters frozen)" if options.freeze_at else ""))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(out / METRICS, start_epoch)
    meta_base = {
        "trained_with": f"segcli {__version__} train", "dataset": str(options.coco), "init": init,
        "input_size": {"min_size": input_min_size(options, arch, min_sizes), "max_size": max_size},
        "settings": {k: v for k, v in asdict(options).items() if k not in ("progress", "quiet")},
    }
    started = time.time()
    iteration = start_epoch * len(batches)
    display = TrainDisplay(total, iteration, dist.is_main and not options.quiet, options.progress, options.log_every, stderr)
    steps = Steps(model, train_model, optimizer, scheduler, scaler, loader, batches, device, max_size, options, display,
                  out, dist.is_main, dist.world_size)
    summary_metrics: list[dict] = []
    epochs_done, stop, stopped_early = start_epoch, stopped(options, since_best), False
    with display:
        for epoch in range(start_epoch, options.epochs):
            if stop:
                stopped_early = True
                break
            if resume_state is not None and epoch == start_epoch:
                restore_rng(resume_state["training"]["rng"])
            batches.set_epoch(epoch)
            set_train_mode(model, freeze_bn, options.freeze_at)
            iteration, record = train_epoch(steps, epoch, iteration)
            if dist.is_main:
                if validator is not None:
                    model.eval()
                    scores = validator.evaluate(model, device, dataset.label_to_category_id)
                    record.update({f"val_{k}": v for k, v in scores.items()})
                mask_ap = record.get("val_segm_AP")
                improved = mask_ap is not None and (best_ap is None or mask_ap > best_ap)
                if improved:
                    best_ap, since_best = mask_ap, 0
                elif mask_ap is not None:
                    since_best += 1
                stop = stopped(options, since_best)
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                meta = dict(meta_base, epoch=epoch + 1, metrics=record)
                training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(), "epoch": epoch, "best_ap": best_ap,
                            "since_best": since_best, "freeze_at": options.freeze_at, "precision": precision,
                            # Nothing draws random numbers between epochs, so this is the state the next
                            # epoch starts from: restoring it makes a resumed run continue exactly.
                            "rng": capture_rng()}
                if improved:
                    save_checkpoint(out / CHECKPOINT_BEST, state, arch, dataset.categories,
                                    dataset.label_to_category_id, meta)
                save_checkpoint(last_path, state, arch, dataset.categories, dataset.label_to_category_id, meta,
                                extra={"training": training})
                append_metrics(out / METRICS, record)
                if options.plots is not None:
                    write_training_plots(read_metrics(out / METRICS), Path(options.plots))
                display.epoch_done(record)
            summary_metrics.append(record)
            epochs_done = epoch + 1
            if dist.enabled:
                stop = agree_to_stop(stop, device)
    if stopped_early:
        say(f"--patience {options.patience}: stopped after epoch {epochs_done} of {options.epochs}, no better "
            f"validation mask AP in {options.patience} validations (best {best_ap:.3f}: {out / CHECKPOINT_BEST})")
    best = out / CHECKPOINT_BEST if best_ap is not None else None
    leave_distributed()  # agree_to_stop was the ranks' last collective
    return TrainSummary(epochs_done, iteration, time.time() - started, last_path, best, best_ap, summary_metrics)


def stopped(options: TrainOptions, since_best: int) -> bool:
    """--patience K: K validations in a row without a better mask AP end the run."""
    return options.patience is not None and since_best >= options.patience


def agree_to_stop(stop: bool, device: torch.device) -> bool:
    """Rank 0 alone validates: every rank takes its decision (this is also the epoch's barrier)."""
    flag = torch.tensor([1 if stop else 0], device=device if device.type == "cuda" else "cpu")
    torch.distributed.broadcast(flag, 0)
    return bool(flag.item())


def report_problems(dataset: CocoDataset, say) -> None:
    shown = 20
    for warning in dataset.warnings[:shown]:
        say(f"warning: {dataset.source}: {warning}")
    if len(dataset.warnings) > shown:
        say(f"warning: {dataset.source}: {len(dataset.warnings) - shown} more problems (all skipped)")


