"""JSON Lines on stdout (no --out): each record printed as soon as it is done, so a pipeline
downstream starts at once and memory does not grow with the input."""

from __future__ import annotations

import sys

from segcli.predict.loop import Result, RunContext, Sink
from segcli.writers.jsonl import JsonlWriter


class StdoutLines(Sink):
    def __init__(self) -> None:
        self.writer = JsonlWriter(sys.stdout.buffer)

    def on_result(self, result: Result) -> list[str]:
        self.writer.add_record(result.record)
        return []


def stdout_lines(context: RunContext) -> Sink | None:
    plan = context.plan
    return StdoutLines() if plan.out is None and plan.format == "jsonl" else None
