"""`segcli review`: parse and validate flags, then hand over to segcli.predict.review_file."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from segcli.cli.app import EXIT_CODES_HELP, app, run_engine
from segcli.cli.command import SegcliCommand
from segcli.text import plural


@app.command(cls=SegcliCommand, epilog=EXIT_CODES_HELP)
def review(
    predictions: str = typer.Argument(
        ..., metavar="PRED", help="Predictions: a COCO file or JSON Lines from segcli predict (-: stdin)."
    ),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="CSV file to write (omitted or -: stdout)."),
    score_thr: Optional[float] = typer.Option(
        None, help="The threshold annotators will use (default: the file's own, else 0.5); "
                   "detections at or below it count as near misses."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary on stderr."),
) -> None:
    """Rank the images of a predictions file by how much a person should look at them, worst
    first, as CSV (the score and its components are described in the README)."""
    from segcli.predict.review_file import ReviewFileOptions, run_review

    options = ReviewFileOptions(predictions=predictions, out=out, score_thr=score_thr)
    rows = run_engine(lambda: run_review(options, stdin=sys.stdin.buffer), "nothing was written")
    if not quiet:
        print(f"segcli: ranked {plural(len(rows), 'image or video frame', 'images and video frames')}", file=sys.stderr)
