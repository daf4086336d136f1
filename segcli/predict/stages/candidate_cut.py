"""With --track or --review the model also returns candidates below --score-thr
(segcli.predict.candidates); this stage cuts each result back to the detections above it, keeping
the candidates in `result.found` for the features that read them."""

from __future__ import annotations

from segcli.predict.core import above
from segcli.predict.loop import Result, RunContext, Stage


class CandidateCut(Stage):
    def __init__(self, score_thr: float) -> None:
        self.score_thr = score_thr

    def on_result(self, result: Result) -> None:
        result.prediction = above(result.found, self.score_thr)


def candidate_cut(context: RunContext) -> Stage | None:
    options = context.options
    return CandidateCut(options.score_thr) if options.track is not None or options.review is not None else None
