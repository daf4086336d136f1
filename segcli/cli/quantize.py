"""`segcli quantize`: parse and validate flags, then hand over to segcli.export.quantize."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from segcli.cli.app import EXIT_CODES_HELP, app, run_engine
from segcli.cli.command import SegcliCommand


@app.command(cls=SegcliCommand, epilog=EXIT_CODES_HELP)
def quantize(
    weights: str = typer.Option(..., help="Registry name, local checkpoint path, or http(s) URL."),
    images: List[str] = typer.Option(..., help="Photos to calibrate on, like those the model will see: files, folders, globs; repeat the flag for several."),
    out: str = typer.Option(..., "--out", "-o", help="The int8 model to write: .pt (segcli's own int8 pipeline, the faster) or .onnx (ONNX Runtime); predict --weights runs either."),
    arch: Optional[str] = typer.Option(None, help="Architecture of a plain torchvision state dict."),
    calibration_images: int = typer.Option(32, help="How many of --images to calibrate on (spread over them); 4 others check the result."),
    scope: str = typer.Option("all", help="all: backbone, FPN, RPN and head layers; backbone: backbone and FPN only."),
    min_agreement: float = typer.Option(0.9, help="Least share of float32 detections the int8 model must keep on held-out photos, or nothing is written."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the float32 export and the int8 model's agreement before writing."),
    score_thr: float = typer.Option(0.05, help="Lowest score the model keeps; predict's --score-thr filters above it."),
    max_det: int = typer.Option(100, help="Most detections per image the model keeps."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr."),
) -> None:
    """Quantize a model to int8 for the CPU, calibrated on your photos.

    A .pt file runs int8 layers inside segcli's own pipeline; a .onnx file is ONNX Runtime's QDQ
    model (needs the ONNX extra: pip install "segcli\\[onnx]"). Either carries a checksum that
    predict checks, and runs only on CPUs with int8 dot-product instructions (VNNI, AMX-INT8)."""
    from segcli.export.quantize import QuantizeOptions
    from segcli.export.quantize_native import quantize as run_quantize

    options = QuantizeOptions(weights=weights, images=list(images), out=out, arch=arch,
                              calibration_images=calibration_images, scope=scope, min_agreement=min_agreement,
                              verify=verify, score_thr=score_thr, max_det=max_det)
    log = (lambda message: None) if quiet else (lambda message: print(f"segcli: {message}", file=sys.stderr))
    summary = run_engine(lambda: run_quantize(options, log=log), "nothing was written")
    if not quiet:
        for note in summary.notes:
            print(f"segcli: note: {note}", file=sys.stderr)
        check = str(summary.agreement) if summary.agreement is not None else "not checked (--no-verify)"
        size = (f"{summary.bytes / 1e6:.1f} MB: float weights and calibrated ranges" if summary.path.suffix.lower() == ".pt"
                else f"{summary.bytes / 1e6:.1f} MB from {summary.float_bytes / 1e6:.1f} MB")
        print(f"segcli: wrote {summary.path} (int8, {summary.quantized_layers} layers, {size}) in {summary.seconds:.1f} s, calibrated on "
              f"{len(summary.calibration)} photo{'' if len(summary.calibration) == 1 else 's'}; {check}; sha256 {summary.sha256}", file=sys.stderr)
