"""`segcli predict`: parse and validate flags, then hand over to segcli.engine.predict."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import List, Optional

import typer

from segcli.cli.app import EXIT_CODES_HELP, app, fail, run_engine
from segcli.errors import ExitCode, UsageError


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
    precision: str = typer.Option("auto", help="auto (bf16 on AMX/AVX-512 CPUs and GPUs), fp32, bf16 or fp16."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (default 8 on a GPU, 1 on a CPU)."),
    workers: Optional[int] = typer.Option(
        None, help="Background decoding threads (default 1 on <= 2 CPU cores, else 2; 0 decodes inline)."
    ),
    track: bool = typer.Option(
        False, "--track", help="Give each instance in a video frame a track_id, the same for one object in every frame."
    ),
    track_low_thr: Optional[float] = typer.Option(
        None, help="With --track: detections above this (default 0.1) but not above --score-thr continue tracks "
                   "(ByteTrack's second stage); they are not written."
    ),
    track_buffer: Optional[int] = typer.Option(
        None, help="With --track: video frames a lost track is kept to be found again (default 30)."
    ),
    track_iou: Optional[float] = typer.Option(
        None, help="With --track: a track and a detection match when the mean of their box and mask IoU is above this "
                   "(default 0.2, as ByteTrack)."
    ),
    review: Optional[str] = typer.Option(
        None, help="Also write a review queue to this CSV: every image and frame scored by how much a person should "
                   "look at it, worst first."
    ),
    review_flip: bool = typer.Option(
        False, "--review-flip", help="With --review: also predict each image mirrored and score the disagreement "
                                     "(a second forward pass per image)."
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
        resume=resume, track=_track_settings(track, track_low_thr, track_buffer, track_iou),
        review=_review_settings(review, review_flip),
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


def _track_settings(track: bool, low_thr: Optional[float], buffer: Optional[int], iou: Optional[float]):
    from segcli.engine.tracking import TrackSettings

    given = {"low_thr": low_thr, "buffer": buffer, "min_similarity": iou}
    flags = {"low_thr": "--track-low-thr", "buffer": "--track-buffer", "min_similarity": "--track-iou"}
    if not track:
        for name, value in given.items():
            if value is not None:
                fail(UsageError(f"{flags[name]} needs --track"))
        return None
    return TrackSettings(**{name: value for name, value in given.items() if value is not None})


def _review_settings(path: Optional[str], flip: bool):
    from segcli.engine.review import ReviewSettings

    if path is None:
        if flip:
            fail(UsageError("--review-flip needs --review FILE"))
        return None
    return ReviewSettings(path, flip)


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
