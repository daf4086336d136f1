"""The tables `segcli eval` prints: COCO metrics per IoU type, then AP per class.

On a terminal they are drawn with rich (colour unless NO_COLOR); anywhere else (a file, a pipe,
a CI log) they are plain whitespace-aligned text without colour or box-drawing characters, wide
enough never to wrap, so that scripts and diffs see stable lines.
"""

from __future__ import annotations

import errno
import os
from typing import TextIO

from rich import box
from rich.console import Console
from rich.table import Table

from segcli.evaluate.metrics import IOU_TYPES, STAT_NAMES

# What each of COCOeval.stats averages over (pycocotools' summarize() lines).
STAT_SETTINGS = {
    "AP": ("0.50:0.95", "all", "100"), "AP50": ("0.50", "all", "100"), "AP75": ("0.75", "all", "100"),
    "APs": ("0.50:0.95", "small", "100"), "APm": ("0.50:0.95", "medium", "100"), "APl": ("0.50:0.95", "large", "100"),
    "AR1": ("0.50:0.95", "all", "1"), "AR10": ("0.50:0.95", "all", "10"), "AR100": ("0.50:0.95", "all", "100"),
    "ARs": ("0.50:0.95", "small", "100"), "ARm": ("0.50:0.95", "medium", "100"), "ARl": ("0.50:0.95", "large", "100"),
}
PLAIN_WIDTH = 1000  # never wrap plain output: a wrapped row is two lines a script misreads


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1 (the code of failed inputs); segcli ends as Unix tools do (cli.command).
        raise BrokenPipeError(errno.EPIPE, "the reader of the tables went away")


def print_tables(report: dict, instances: dict[str, int], stream: TextIO) -> None:
    """Print the metrics table and the per-class table of a `--report` dict to `stream`."""
    console = _Console(file=stream, highlight=False, no_color="NO_COLOR" in os.environ or None)
    if not console.is_terminal:
        console = _Console(file=stream, highlight=False, no_color=True, width=PLAIN_WIDTH, color_system=None)
    fancy = console.is_terminal
    types = [t for t in IOU_TYPES if t in report]
    if not types:
        return
    console.print(metrics_table(report, types, fancy))
    console.print()
    console.print(per_class_table(report, types, instances, fancy))


def metrics_table(report: dict, types: list[str], fancy: bool) -> Table:
    """One row per statistic, one column per IoU type: fits 80 columns, reads like pycocotools."""
    table = _table("COCO metrics" if fancy else None, fancy)
    table.add_column("metric", style="bold" if fancy else None)
    for iou_type in types:
        table.add_column(iou_type, justify="right")
    table.add_column("IoU", style="dim" if fancy else None)
    table.add_column("area", style="dim" if fancy else None)
    table.add_column("max dets", justify="right", style="dim" if fancy else None)
    for name in STAT_NAMES:
        iou, area, max_dets = STAT_SETTINGS[name]
        table.add_row(name, *(format_value(report[iou_type][name]) for iou_type in types), iou, area, max_dets)
    return table


def per_class_table(report: dict, types: list[str], instances: dict[str, int], fancy: bool) -> Table:
    table = _table("AP per class" if fancy else None, fancy)
    table.add_column("class")
    table.add_column("instances", justify="right")
    for iou_type in types:
        table.add_column(f"{iou_type} AP", justify="right")
    names = list(dict.fromkeys(name for iou_type in types for name in report["per_class"][iou_type]))
    for name in names:
        values = [report["per_class"][iou_type].get(name) for iou_type in types]
        table.add_row(name, str(instances.get(name, "")), *(format_value(v) for v in values))
    return table


def format_value(value: float | None) -> str:
    # pycocotools marks "no ground truth in this range" as -1; a dash reads as "not applicable".
    if value is None or value < 0:
        return "-"
    return f"{value:.3f}"


def _table(title: str | None, fancy: bool) -> Table:
    if fancy:
        return Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    return Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1))
