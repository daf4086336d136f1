"""One epoch of training: the steps (forward, backward, optimizer), the loss lines shown and
logged, and the epoch's record."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segcli.data.train_samples import EpochBatches
from segcli.errors import ExitCode, SegcliError
from segcli.model.preprocess import ResizePolicy
from segcli.train.checkpoints import append_metrics
from segcli.train.log import TrainDisplay
from segcli.train.options import METRICS, TrainOptions
from segcli.train.timing import StepTimer


class TrainingDiverged(SegcliError):
    exit_code = ExitCode.SOME_INPUTS_FAILED  # exit 1: the run stopped partway (documented in --help)


@dataclass
class Steps:
    """What an epoch's steps need: the model (wrapped for the losses, perhaps in DDP), its
    optimizer, schedule and scaler, the data, and where lines go."""

    model: nn.Module  # the MaskRCNN itself (its parameters, its state)
    train_model: nn.Module  # TrainingModel around it (under DistributedDataParallel when distributed)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: torch.utils.data.DataLoader
    batches: EpochBatches
    device: torch.device
    max_size: int
    options: TrainOptions
    display: TrainDisplay
    out: Path
    is_main: bool
    world_size: int


def train_epoch(steps: Steps, epoch: int, iteration: int) -> tuple[int, dict]:
    """Train one epoch from `iteration`; return the iteration reached and the epoch's record
    (mean losses, lr, images/s, seconds, and the mean step's time by phase: `step_ms`)."""
    options, optimizer, scaler, display = steps.options, steps.optimizer, steps.scaler, steps.display
    sums: dict[str, torch.Tensor] = {}
    epoch_start, seen = time.time(), 0
    timer = StepTimer(split_compute=steps.device.type == "cpu")
    timer.start()
    for batch in steps.loader:
        batch = batch.to(steps.device)
        timer.mark("data")
        losses = steps.train_model(batch.images, batch.sizes, batch.targets, ResizePolicy(batch.min_size, steps.max_size))
        loss = sum(losses.values())
        timer.mark("forward")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        timer.mark("backward")
        if options.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(steps.model.parameters(), options.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        steps.scheduler.step()
        timer.mark("optimizer")
        iteration += 1
        seen += len(batch.sizes) * steps.world_size
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
            if steps.is_main:
                append_metrics(steps.out / METRICS, line)
        timer.step_done()
    count = max(1, len(steps.batches))
    epoch_losses = {k: float(v) / count for k, v in sums.items()}
    if not all(math.isfinite(v) for v in epoch_losses.values()):
        raise TrainingDiverged(f"the loss became {epoch_losses.get('loss')} in epoch {epoch + 1}; lower --lr or "
                               "set --clip-grad")
    record = {"epoch": epoch + 1, "iteration": iteration, "lr": optimizer.param_groups[0]["lr"],
              **{f"train_{k}": round(v, 5) for k, v in epoch_losses.items()},
              "images_per_s": round(seen / max(time.time() - epoch_start, 1e-9), 3),
              "seconds": round(time.time() - epoch_start, 2), "step_ms": timer.summary()}
    return iteration, record
