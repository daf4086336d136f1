"""`segcli predict`: parse and validate flags, then hand over to segcli.engine.predict."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from segcli.cli.app import EXIT_CODES_HELP, app, fail
from segcli.errors import ExitCode, SegcliError


@app.command(epilog=EXIT_CODES_HELP)
def predict(
    sources: List[str] = typer.Argument(
        ..., metavar="SOURCE...",
        help="Image files, folders (recursive), quoted globs ('photos/**/*.jpg'), .txt lists of paths, or - for paths on stdin.",
    ),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output file (COCO JSON). Omitted or -: stdout."),
    weights: str = typer.Option("coco", help="Registry name, local checkpoint path, or http(s) URL."),
    arch: Optional[str] = typer.Option(None, help="Architecture of a plain torchvision state dict."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on AMX/AVX-512 CPUs and GPUs), fp32, bf16 or fp16."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (default 8 on a GPU, 1 on a CPU)."),
    score_thr: float = typer.Option(0.5, help="Keep detections scoring above this."),
    max_det: int = typer.Option(100, help="At most this many detections per image."),
    format: str = typer.Option("coco", "--format", help="coco (dataset file) or coco-results (the list COCO.loadRes takes)."),
    workers: Optional[int] = typer.Option(
        None, help="Background image-decoding threads (default 1 on <= 2 CPU cores, else 2; 0 decodes inline)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, warnings or summary on stderr."),
) -> None:
    """Predict masks for images and write them as COCO JSON."""
    from segcli.engine.predict import PredictOptions, run_predict

    options = PredictOptions(
        sources=sources, out=out, weights=weights, arch=arch, device=device, precision=precision,
        batch_size=batch_size, score_thr=score_thr, max_det=max_det, format=format, workers=workers, quiet=quiet,
    )
    try:
        summary = run_predict(options, stdin=sys.stdin)
    except SegcliError as error:
        fail(error)
    except KeyboardInterrupt:
        print("segcli: interrupted; the output written so far is valid", file=sys.stderr)
        raise typer.Exit(int(ExitCode.INTERRUPTED))
    if not quiet:
        rate = summary.images / summary.seconds if summary.seconds else 0.0
        print(
            f"segcli: {summary.images} images, {summary.detections} detections in {summary.seconds:.1f} s "
            f"({rate:.2f} images/s)" + (f"; {len(summary.failures)} inputs failed:" if summary.failures else ""),
            file=sys.stderr,
        )
        for path, reason in summary.failures:
            print(f"  {path}: {reason}", file=sys.stderr)
    if summary.failures:
        raise typer.Exit(int(ExitCode.SOME_INPUTS_FAILED))
