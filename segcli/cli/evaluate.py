"""`segcli eval`: parse and validate flags, then hand over to segcli.evaluate.run."""

from __future__ import annotations

from typing import Optional

import typer

from segcli.cli.app import EXIT_CODES_HELP, app, run_engine
from segcli.cli.command import SegcliCommand
from segcli.errors import ExitCode


@app.command("eval", cls=SegcliCommand, epilog=EXIT_CODES_HELP)
def evaluate(
    gt: str = typer.Option(..., "--gt", help="Ground truth: a COCO dataset file (images, categories, annotations)."),
    pred: Optional[str] = typer.Option(
        None, "--pred", help="Predictions: a COCO file or JSON Lines from segcli predict, or a bare results list (-: stdin)."
    ),
    images: Optional[str] = typer.Option(
        None, "--images", help="Instead of --pred: predict this folder first (score > 0.05, 100 per image), then score."
    ),
    weights: Optional[str] = typer.Option(None, help="With --images: registry name, checkpoint or URL (default: coco)."),
    arch: Optional[str] = typer.Option(None, help="With --images: architecture of a plain torchvision state dict."),
    device: str = typer.Option("auto", help="With --images: auto, cpu, cuda or cuda:N."),
    save_pred: Optional[str] = typer.Option(None, "--save-pred", help="With --images: keep the predictions in this file."),
    iou_type: str = typer.Option("segm,bbox", "--iou-type", help="segm, bbox or segm,bbox."),
    report: Optional[str] = typer.Option(
        None, "--report", help="Write the metrics as JSON to this file (-: JSON on stdout, tables on stderr)."
    ),
    plots: Optional[str] = typer.Option(None, "--plots", help="Write precision-recall curves (pr_segm.png, pr_bbox.png) here."),
    workers: Optional[int] = typer.Option(
        None, help="Processes for pycocotools' per-image work (default: one per 32 images, up to the CPU count; 1 on <= 2 cores)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No warnings or progress on stderr; images --images cannot read are still named."),
) -> None:
    """Score predictions against COCO ground truth with pycocotools: metrics and per-class AP on stdout."""
    from segcli.evaluate.run import EvalOptions, run_eval

    options = EvalOptions(gt=gt, pred=pred, images=images, weights=weights, arch=arch, device=device,
                          save_pred=save_pred, iou_type=iou_type, report=report, plots=plots, workers=workers,
                          quiet=quiet)
    outcome = run_engine(lambda: run_eval(options), "no report was written")
    if outcome.failed_inputs:
        raise typer.Exit(int(ExitCode.SOME_INPUTS_FAILED))
