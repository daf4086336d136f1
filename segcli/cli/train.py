"""`segcli train`: parse and validate flags, then hand over to segcli.train.run."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from segcli.cli.app import EXIT_CODES_HELP, app, run_engine
from segcli.cli.command import SegcliCommand
from segcli.errors import UsageError

TRAIN_EPILOG = (
    "Several GPUs or machines: torchrun --nproc-per-node N -m segcli train ... (DistributedDataParallel; only "
    "rank 0 writes). " + EXIT_CODES_HELP + " Training also exits 1 when the loss diverges."
)


def parse_sizes(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--min-size {text!r}: give pixel sizes separated by commas, e.g. 480,512,544") from None


def parse_jitter(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise UsageError(f"--scale-jitter {text!r}: give the shortest and longest short side in pixels, "
                         "e.g. 640,1024") from None


# Help shows the ~32 options in these groups, in this order.
DATA, MODEL, SCHEDULE, OUTPUT = "Data", "Model", "Schedule", "Output"


@app.command(cls=SegcliCommand, epilog=TRAIN_EPILOG)
def train(
    coco: str = typer.Option(..., "--coco", rich_help_panel=DATA, help="COCO instance annotations to train on (polygons or RLE)."),
    images: Optional[str] = typer.Option(None, rich_help_panel=DATA, help="Folder the file_name paths are relative to (default: beside --coco, or its images/)."),
    val_coco: Optional[str] = typer.Option(None, rich_help_panel=DATA, help="COCO annotations to validate on after every epoch (mask and box AP; picks best.pt)."),
    val_images: Optional[str] = typer.Option(None, rich_help_panel=DATA, help="Images folder of --val-coco."),
    weights: Optional[str] = typer.Option(None, rich_help_panel=MODEL, help="Initial weights: registry name (coco), checkpoint or URL; none (or omitted): random initialization."),
    arch: Optional[str] = typer.Option(None, rich_help_panel=MODEL, help="Architecture (default: that of --weights, else maskrcnn_resnet50_fpn_v2)."),
    epochs: int = typer.Option(12, rich_help_panel=SCHEDULE, help="Passes over the training set."),
    batch_size: int = typer.Option(2, rich_help_panel=SCHEDULE, help="Images per iteration, per process."),
    lr: Optional[float] = typer.Option(None, rich_help_panel=SCHEDULE, help="Base learning rate (default: 0.02 x total batch / 16 for SGD, 1e-4 for AdamW)."),
    optimizer: str = typer.Option("sgd", rich_help_panel=SCHEDULE, help="sgd (momentum 0.9) or adamw."),
    schedule: str = typer.Option("step", rich_help_panel=SCHEDULE, help="step (x0.1 at 2/3 and 8/9 of training) or cosine."),
    warmup_iters: Optional[int] = typer.Option(None, rich_help_panel=SCHEDULE, help="Linear warmup iterations (default: min(1000, a tenth of training))."),
    weight_decay: Optional[float] = typer.Option(None, rich_help_panel=SCHEDULE, help="Default 1e-4 (SGD), 0.05 (AdamW)."),
    clip_grad: Optional[float] = typer.Option(None, rich_help_panel=SCHEDULE, help="Clip the gradient norm to this value."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", rich_help_panel=SCHEDULE, help="Mixed precision (default: as --precision auto); --no-amp is fp32."),
    min_size: Optional[str] = typer.Option(None, rich_help_panel=DATA, help="Short sides for multi-scale training, comma-separated (default: 80-100% of the architecture's)."),
    max_size: Optional[int] = typer.Option(None, rich_help_panel=DATA, help="Longest side after resizing (default: the architecture's)."),
    flip: bool = typer.Option(True, "--flip/--no-flip", rich_help_panel=DATA, help="Random horizontal flips."),
    freeze_bn: Optional[bool] = typer.Option(None, "--freeze-bn/--train-bn", rich_help_panel=MODEL, help="Keep BatchNorm statistics (default: frozen with --weights, trained from scratch)."),
    rois_per_image: int = typer.Option(512, rich_help_panel=MODEL, help="Sampled RoIs per image for the box and mask heads."),
    workers: Optional[int] = typer.Option(None, rich_help_panel=DATA, help="Data-loading processes (default: min(4, CPU cores - 1))."),
    device: str = typer.Option("auto", rich_help_panel=MODEL, help="auto, cpu, cuda or cuda:N (under torchrun: each rank's own GPU)."),
    out: str = typer.Option("runs/train", "--out", "-o", rich_help_panel=OUTPUT, help="Run folder: last.pt, best.pt, metrics.jsonl."),
    resume: bool = typer.Option(False, "--resume", rich_help_panel=OUTPUT, help="Continue the run in --out from its last.pt."),
    seed: int = typer.Option(0, rich_help_panel=SCHEDULE, help="Seed of the initialization, data order and augmentation."),
    log_every: int = typer.Option(20, rich_help_panel=OUTPUT, help="Iterations between log lines and metrics.jsonl entries."),
    quiet: bool = typer.Option(False, "--quiet", "-q", rich_help_panel=OUTPUT, help="No progress or log lines on stderr."),
    freeze_at: int = typer.Option(0, rich_help_panel=MODEL, help="Freeze the start of the ResNet, as detectron2's FREEZE_AT: 1 the stem, 2 the stem and the first stage, ... 5 all of it; 0 trains all (default)."),
    scale_jitter: Optional[str] = typer.Option(None, rich_help_panel=DATA, help="MIN,MAX: each batch's short side drawn from MIN to MAX pixels (steps of 16), instead of --min-size's list; the long side stays within --max-size."),
    patience: Optional[int] = typer.Option(None, rich_help_panel=SCHEDULE, help="Early stopping: end the run after this many validations without a better mask AP (needs --val-coco; best.pt keeps the best)."),
    plots: Optional[str] = typer.Option(None, rich_help_panel=OUTPUT, help="Folder for loss.png and, with --val-coco, ap.png (mask and box AP per epoch), redrawn after every epoch."),
    precision: Optional[str] = typer.Option(None, rich_help_panel=SCHEDULE, help="auto, fp32 or bf16 (autocast). auto: mixed precision on CUDA, bf16 on CPUs with AVX-512 BF16 or AMX, else fp32. bf16 on a CPU without them is refused (emulated, it is slower)."),
) -> None:
    """Train or fine-tune Mask R-CNN on a COCO dataset; writes last.pt, best.pt and metrics.jsonl."""
    from segcli.distributed import dist_from_env
    from segcli.train.run import TrainOptions, run_train

    def run():  # parse_sizes can raise UsageError: it gets the same one line as the engine's errors
        options = TrainOptions(
            coco=coco, images=images, val_coco=val_coco, val_images=val_images, weights=weights, arch=arch,
            epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
            warmup_iters=warmup_iters, weight_decay=weight_decay, clip_grad=clip_grad, amp=amp,
            min_sizes=parse_sizes(min_size), max_size=max_size, flip=flip, freeze_bn=freeze_bn,
            rois_per_image=rois_per_image, workers=workers, device=device, out=out, resume=resume, seed=seed,
            log_every=log_every, quiet=quiet, freeze_at=freeze_at, scale_jitter=parse_jitter(scale_jitter),
            patience=patience, plots=plots, precision=precision,
        )
        return run_train(options)

    summary = run_engine(run, "the last finished epoch is in last.pt (continue with --resume)")
    if not quiet and dist_from_env().is_main:  # under torchrun rank 0 reports for all
        best = f", best {summary.best} (mask AP {summary.best_ap:.3f})" if summary.best else ""
        if plots is not None:
            best += f"; plots in {plots}"
        print(f"segcli: trained {summary.iterations} iterations in {summary.seconds / 60:.1f} min; last {summary.last}{best}",
              file=sys.stderr)
