"""`segcli predict`: parse and validate flags, then hand over to segcli.predict.run."""

from __future__ import annotations

import signal
import sys
import warnings
from typing import List, Optional

import typer

from segcli import STARTED
from segcli.cli.app import EXIT_CODES_HELP, app, fail, run_engine
from segcli.cli.command import SegcliCommand
from segcli.data.sources import describe_ignored
from segcli.errors import ExitCode, UsageError
from segcli.text import escaped, plural


@app.command(cls=SegcliCommand, epilog=EXIT_CODES_HELP)
def predict(
    sources: List[str] = typer.Argument(
        ..., metavar="SOURCE...",
        help="Image or video files, folders (recursive), quoted globs ('photos/**/*.jpg'), .txt lists of paths, "
             "or - for paths on stdin.",
    ),
    out: Optional[str] = typer.Option(
        None, "--out", "-o",
        help="Output file or folder. Omitted or -: JSON Lines on stdout. The format follows the extension "
             "(.json coco, .jsonl jsonl, .geojson geojson, .xml cvat) or a folder (labelme) unless --format says.",
    ),
    format: Optional[str] = typer.Option(
        None, "--format",
        help="coco, coco-results (the list COCO.loadRes takes), jsonl, geojson (one file); "
             "labelme, yolo, png (one file per image, --out is a folder); label-studio (Label Studio's task "
             "JSON with pre-annotations: brush masks, or polygons with --masks polygon); cvat (CVAT for images "
             "1.1 XML, or CVAT for video 1.1 with tracks for one video; masks, or polygons with --masks polygon).",
    ),
    image_url_prefix: Optional[str] = typer.Option(
        None, help="--format label-studio: images at PREFIX + file_name (default: the server's local files, "
                   "by absolute path; the server needs LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/)."),
    masks: str = typer.Option("rle", help="Mask encoding for coco, coco-results and jsonl (and the shape of label-studio and cvat): rle or polygon."),
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
    precision: str = typer.Option("auto", help="auto (bf16 on GPUs and on CPUs with AVX-512 BF16 or AMX; int8 for a model made by segcli quantize), fp32, bf16, fp16 or int8."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (default 8 on a GPU, 1 on a CPU)."),
    workers: Optional[int] = typer.Option(
        None, help="Background decoding threads (default 1 on <= 2 CPU cores, else 2; 0 decodes inline)."
    ),
    streams: Optional[int] = typer.Option(
        None, help="Batches predicted at once, each on an equal share of the CPU threads (default 1). "
                   "2 on 2 cores keeps both busy through NMS and mask encoding: 1.15x on small models, "
                   "none on R50. bf16 results are those of a run on threads/N threads."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, notes or summary on stderr; failed inputs are still named."),
    slice: str = typer.Option(
        "auto", "--slice",
        help="Huge images as overlapping tiles: a tile size in pixels, auto (images the model would shrink "
             "more than 4x, in tiles of its input size) or off.",
    ),
    overlap: float = typer.Option(0.2, help="Fraction of a tile its neighbours share (0 to 0.9)."),
    slice_merge: str = typer.Option("nmm", help="Joining detections of overlapping tiles: nmm (merge) or nms (keep the best)."),
    slice_match: str = typer.Option("iou", help="Tiles' detections are one object when their masks' iou or ios "
                                                "(where both tiles saw the image) reaches --slice-match-thr."),
    slice_match_thr: float = typer.Option(0.5, help="Threshold of --slice-match."),
    slice_whole: bool = typer.Option(True, "--slice-whole/--no-slice-whole",
                                     help="With --slice, also run the whole image downscaled (objects larger than a tile)."),
    shard: Optional[str] = typer.Option(
        None, metavar="K/N",
        help="Predict only the K-th of N equal slices of the sorted inputs (1/N..N/N); join the parts with segcli merge.",
    ),
    ray: bool = typer.Option(False, "--ray", help="Run on a Ray cluster (pip install \"segcli[ray]\"): RAY_ADDRESS, "
                                                 "a cluster started on this machine, else a local one."),
    ray_address: Optional[str] = typer.Option(None, metavar="ADDRESS",
                                              help="Ray cluster to join (auto, HOST:PORT, ray://HOST:PORT); implies --ray."),
    ray_actors: Optional[int] = typer.Option(None, help="With --ray: model replicas (default one per GPU, else one per 4 CPUs)."),
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
) -> None:
    """Predict instance masks for images and videos and write them as COCO, JSON Lines, GeoJSON,
    LabelMe, YOLO or PNG; data goes to stdout only, logs and progress to stderr."""
    from segcli.distributed import dist_from_env
    from segcli.predict.options import PredictOptions
    from segcli.predict.run import run_predict

    if ray_actors is not None and not ray and ray_address is None:
        fail(UsageError("--ray-actors needs --ray (or --ray-address)"))
    options = PredictOptions(
        sources=sources, out=out, weights=weights, arch=arch, device=device, precision=precision,
        batch_size=batch_size, score_thr=score_thr, max_det=max_det, format=format, workers=workers, streams=streams, quiet=quiet,
        masks=masks, poly_tolerance=poly_tolerance, classes=classes, vid_stride=vid_stride, overlay=overlay,
        resume=resume, slice=slice, overlap=overlap, slice_merge=slice_merge, slice_match=slice_match,
        slice_match_thr=slice_match_thr, slice_whole=slice_whole, shard=shard,
        ray=ray_address if ray_address is not None else ("" if ray else None), ray_actors=ray_actors,
        track=_track_settings(track, track_low_thr, track_buffer, track_iou),
        review=_review_settings(review, review_flip), image_url_prefix=image_url_prefix,
    )
    quiet = options.quiet = quiet or not dist_from_env().is_main  # under torchrun rank 0 reports for all
    # Pillow warns about oddities it recovers from ("Corrupt EXIF data"); segcli reports what
    # matters about an input in its own one line, and a warning per file would flood cron logs.
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    # cron and container stops send SIGTERM: stop like Ctrl-C, so the output written so far is valid.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        # A reader of stdout that goes away (`| head`) ends the run by SIGPIPE (see cli.command).
        summary = run_engine(lambda: run_predict(options, stdin=sys.stdin),
                             "the output written so far is valid (rerun with --resume to finish)")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not quiet:
        print(_summary_line(summary), file=sys.stderr)
        for path, reason in summary.failures:
            print(f"  {escaped(path)}: {escaped(reason)}", file=sys.stderr)
    if summary.failures:
        raise typer.Exit(int(ExitCode.SOME_INPUTS_FAILED))


def _track_settings(track: bool, low_thr: Optional[float], buffer: Optional[int], iou: Optional[float]):
    from segcli.predict.tracking import TrackSettings

    given = {"low_thr": low_thr, "buffer": buffer, "min_similarity": iou}
    flags = {"low_thr": "--track-low-thr", "buffer": "--track-buffer", "min_similarity": "--track-iou"}
    if not track:
        for name, value in given.items():
            if value is not None:
                fail(UsageError(f"{flags[name]} needs --track"))
        return None
    return TrackSettings(**{name: value for name, value in given.items() if value is not None})


def _review_settings(path: Optional[str], flip: bool):
    from segcli.predict.review import ReviewSettings

    if path is None:
        if flip:
            fail(UsageError("--review-flip needs --review FILE"))
        return None
    return ReviewSettings(path, flip)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _summary_line(summary) -> str:
    rate = (summary.images + summary.frames) / summary.seconds if summary.seconds else 0.0
    parts = [plural(summary.images, "image")]
    if summary.frames:
        parts.append(plural(summary.frames, "video frame"))
    first = "" if summary.first_result_at is None else f"; first result {summary.first_result_at - STARTED:.1f} s after start"
    line = (f"segcli: {', '.join(parts)}, {plural(summary.detections, 'detection')} in {summary.seconds:.1f} s "
            f"({rate:.2f}/s{first})")
    if summary.reused:
        line += f"; {plural(summary.reused, 'input')} unchanged since the last run (--resume)"
    ignored = sum(summary.ignored.values())
    if ignored:
        line += (f"; {plural(ignored, 'file')} of other types in SOURCE folders not read "
                 f"({describe_ignored(summary.ignored)})")
    if summary.failures:
        line += f"; {plural(len(summary.failures), 'input')} failed:"
    return line
