"""`segcli merge`: join the parts of a `segcli predict --shard K/N` run into one file."""

from __future__ import annotations

import sys
from typing import List

import typer

from segcli.cli.app import EXIT_CODES_HELP, app, run_engine
from segcli.cli.command import SegcliCommand
from segcli.text import escaped, plural


@app.command(cls=SegcliCommand, epilog=EXIT_CODES_HELP)
def merge(
    parts: List[str] = typer.Argument(..., metavar="PART...",
                                      help="The parts: files written by segcli predict --shard K/N --out PART."),
    out: str = typer.Option(..., "--out", "-o", help="The merged file (written atomically)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary on stderr."),
) -> None:
    """Merge the parts of a sharded prediction (coco, coco-results, jsonl, geojson) into the file one
    process over every input writes, byte for byte: same image and annotation ids, same order."""
    from segcli.predict.merge import merge_parts

    summary = run_engine(lambda: merge_parts(parts, out), "nothing was written")
    if not quiet:
        print(f"segcli: merged {plural(summary.parts, 'part')} ({plural(summary.inputs, 'input')}, "
              f"{plural(summary.records, 'image or video frame', 'images and video frames')}, {summary.format}) "
              f"into {escaped(summary.out)} in {summary.seconds:.1f} s", file=sys.stderr)
