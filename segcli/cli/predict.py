"""`segcli predict`: parse and validate flags, then hand over to segcli.engine.predict."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import List, Optional

import typer

from segcli.cli.app import EXIT_CODES_HELP, app, run_engine
from segcli.errors import ExitCode


@app.command(epilog=EXIT_CODES_HELP)
def predict(
    sources: List[str] = typer.Argument(
        ..., metavar="SOURCE...",
        help="Image or video files, folders (recursive), quoted globs ('photos/**/*.jpg'), .txt lists of paths, "
             "or - for paths on stdin.",
    ),
    out: Optional[str] = typer.Option(
        None, "--out", "-o",
        help="Output file or folder. Omitted or -: JSON Lines on stdout. The format follows the extension "
             "(.json coco, .jsonl jsonl, .geojson geojson) or a folder (labelme) unless --format says.",
    ),
    format: Optional[str] = typer.Option(
        None, "--format",
        help="coco, coco-results (the list COCO.loadRes takes), jsonl, geojson (one file); "
             "labelme, yolo, png (one file per image, --out is a folder).",
    ),
    masks: str = typer.Option("rle", help="Mask encoding for coco, coco-results and jsonl: rle or polygon."),
    poly_tolerance: float = typer.Option(1.0, help="Polygon simplification tolerance in pixels (0: exact outline)."),
    overlay: Optional[str] = typer.Option(None, help="Also draw the predictions into this folder (videos: an overlay video)."),
    resume: bool = typer.Option(
        False, "--resume",
        help="Skip inputs already done by an earlier run into the same --out with the same model and settings "
             "(off by default: a run without it starts over).",
    ),
    classes: Optional[List[str]] = typer.Option(None, help="Keep only these categories: names or ids, comma-separated or repeated."),
    score_thr: float = typer.Option(0.5, help="Keep detections scoring above this."),
    max_det: int = typer.Option(100, help="At most this many detections per image or frame."),
    vid_stride: int = typer.Option(1, help="Predict every N-th video frame."),
    weights: str = typer.Option("coco", help="Registry name, local checkpoint path, or http(s) URL."),
    arch: Optional[str] = typer.Option(None, help="Architecture of a plain torchvision state dict."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPUs and on CPUs with AVX-512 BF16 or AMX), fp32, bf16 or fp16."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (default 8 on a GPU, 1 on a CPU)."),
    workers: Optional[int] = typer.Option(
        None, help="Background decoding threads (default 1 on <= 2 CPU cores, else 2; 0 decodes inline)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, warnings or summary on stderr."),
) -> None:
    """Predict instance masks for images and videos and write them as COCO, JSON Lines, GeoJSON,
    LabelMe, YOLO or PNG; data goes to stdout only, logs and progress to stderr."""
    from segcli.engine.predict import PredictOptions, run_predict

    options = PredictOptions(
        sources=sources, out=out, weights=weights, arch=arch, device=device, precision=precision,
        batch_size=batch_size, score_thr=score_thr, max_det=max_det, format=format, workers=workers, quiet=quiet,
        masks=masks, poly_tolerance=poly_tolerance, classes=classes, vid_stride=vid_stride, overlay=overlay,
        resume=resume,
    )
    # Pillow warns about oddities it recovers from ("Corrupt EXIF data"); segcli reports what
    # matters about an input in its own one line, and a warning per file would flood cron logs.
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    # cron and container stops send SIGTERM: stop like Ctrl-C, so the output written so far is valid.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run_engine(lambda: run_predict(options, stdin=sys.stdin),
                             "the output written so far is valid (rerun with --resume to finish)")
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(int(ExitCode.SOME_INPUTS_FAILED))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not quiet:
        print(_summary_line(summary), file=sys.stderr)
        for path, reason in summary.failures:
            print(f"  {path}: {reason}", file=sys.stderr)
    if summary.failures:
        raise typer.Exit(int(ExitCode.SOME_INPUTS_FAILED))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _summary_line(summary) -> str:
    rate = (summary.images + summary.frames) / summary.seconds if summary.seconds else 0.0
    parts = [f"{summary.images} images"]
    if summary.frames:
        parts.append(f"{summary.frames} video frames")
    line = f"segcli: {', '.join(parts)}, {summary.detections} detections in {summary.seconds:.1f} s ({rate:.2f}/s)"
    if summary.reused:
        line += f"; {summary.reused} inputs unchanged since the last run (--resume)"
    if summary.failures:
        line += f"; {len(summary.failures)} inputs failed:"
    return line
