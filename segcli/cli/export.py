"""`segcli export`: parse and validate flags, then hand over to segcli.export.run."""

from __future__ import annotations

import sys
from typing import List, Optional, Tuple

import typer

from segcli.cli.app import EXIT_CODES_HELP, app, run_engine
from segcli.cli.command import SegcliCommand


@app.command(cls=SegcliCommand, epilog=EXIT_CODES_HELP)
def export(
    weights: str = typer.Option(..., help="Registry name, local checkpoint path, or http(s) URL."),
    format: str = typer.Option(..., "--format", help="torchscript or onnx (needs: pip install \"segcli\\[onnx]\")."),
    out: str = typer.Option(..., "--out", "-o", help="File to write (.onnx for ONNX; e.g. .ts for TorchScript)."),
    arch: Optional[str] = typer.Option(None, help="Architecture of a plain torchvision state dict."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset, 16 to 20 (default 17)."),
    batch: Optional[int] = typer.Option(None, help="Fix the batch size (default: dynamic)."),
    image_size: Optional[Tuple[int, int]] = typer.Option(
        None, metavar="H W", help="Fix the input image size (default: dynamic); smaller images are padded, larger ones scaled down."
    ),
    images: Optional[List[str]] = typer.Option(
        None, help="Photos to verify with: files, folders, globs; repeat the flag for several; the first 4 are used. Default: bundled samples."
    ),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare the exported model with the eager one."),
    score_thr: float = typer.Option(0.05, help="Lowest score the exported model keeps; predict's --score-thr filters above it."),
    max_det: int = typer.Option(100, help="Most detections per image the exported model keeps."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr."),
) -> None:
    """Export the model to TorchScript or ONNX (uint8 images in, boxes, scores, labels, 28x28 masks out),
    verified against the eager model on real photos before the file is written. A failed
    verification writes nothing and exits with 3; without onnx/onnxruntime, ONNX export exits with 3."""
    from segcli.export.run import ExportOptions, run_export

    options = ExportOptions(
        weights=weights, format=format.lower(), out=out, arch=arch, opset=opset, batch=batch,
        image_size=tuple(image_size) if image_size else None, images=list(images or []), verify=verify,
        score_thr=score_thr, max_det=max_det,
    )
    log = (lambda message: None) if quiet else (lambda message: print(f"segcli: {message}", file=sys.stderr))
    summary = run_engine(lambda: run_export(options, log=log), "nothing was written")
    if not quiet:
        check = "not verified (--no-verify)"
        if summary.verification is not None:
            check = f"verified: {summary.verification} ({', '.join(summary.samples)})"
        print(f"segcli: wrote {summary.path} ({summary.format}, {summary.bytes / 1e6:.1f} MB) in "
              f"{summary.seconds:.1f} s; {check}", file=sys.stderr)
