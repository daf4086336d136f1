"""Which stages and sinks a run has, in which order: the one place where features are named.

Each entry takes the RunContext and returns its stage or sink, or None when the run's options do
not ask for it. Order matters: stages run in this order on every result (the cut to --score-thr
before the record is built, track ids after), and sinks take each event in this order (the
journal last, so that it records every file the others wrote for an input). A new stage or sink
is one new module under stages/ or sinks/ plus one line here.
"""

from __future__ import annotations

from segcli.predict.loop import RunContext, RunLoop
from segcli.predict.sinks.journal import journal_sink
from segcli.predict.sinks.overlay import overlay_sink
from segcli.predict.sinks.per_image import per_image_sink
from segcli.predict.sinks.review import review_sink
from segcli.predict.sinks.stdout_lines import stdout_lines
from segcli.predict.stages.candidate_cut import candidate_cut
from segcli.predict.stages.records import record_stage
from segcli.predict.stages.track_ids import track_ids

STAGES = (
    candidate_cut,  # --track/--review: results cut back to --score-thr; the candidates stay in `found`
    record_stage,  # the output record every sink reads
    track_ids,  # --track: ids on video frames' instances
)
SINKS = (
    review_sink,  # --review: the review queue's rows
    per_image_sink,  # labelme, yolo, png
    overlay_sink,  # --overlay
    stdout_lines,  # JSON Lines on stdout
    journal_sink,  # the resume journal, and the one-file formats assembled from it at the end
)


def build_loop(context: RunContext) -> RunLoop:
    """The run loop of `context`, with its stages and sinks; context.predictor becomes the
    predictor the run calls (sinks and stages may wrap it)."""
    stages = [stage for make in STAGES if (stage := make(context)) is not None]
    sinks = [sink for make in SINKS if (sink := make(context)) is not None]
    for part in (*stages, *sinks):
        context.predictor = part.predictor_for_run(context.predictor)
    return RunLoop(context, stages, sinks)
