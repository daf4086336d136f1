"""--review: each image's and frame's row of the review queue (segcli.predict.review), from all
its detections, candidates below --score-thr included; the CSV is written at the end."""

from __future__ import annotations

from segcli.predict.loop import Finished, Result, RunContext, Sink
from segcli.predict.review import ReviewQueue


class ReviewSink(Sink):
    def __init__(self, context: RunContext) -> None:
        options, keys = context.options, context.keys
        self.keys = keys
        reused = set(keys) - {keys[i] for i in context.todo}
        self.queue = ReviewQueue(options.review, options.score_thr, context.plan.state_dir, options.resume, reused)
        if self.queue.missing:
            context.warn(f"--review: {self.queue.missing} inputs done by the earlier run have no review rows "
                         f"(its review store is gone); run without --resume to review them")

    def predictor_for_run(self, predictor):
        return self.queue.predictor_for_run(predictor)  # --review-flip: mirror images too

    def on_result(self, result: Result) -> list[str]:
        self.queue.add(result.key, result.record, result.found, result.decoded)
        return []

    def on_input_done(self, done: Finished) -> list[str]:
        self.queue.input_done(done.key)  # before the journal's mark (a later sink), so --resume finds its rows
        return []

    def on_failed(self, index: int, key: str) -> None:
        self.queue.forget(key)

    def finish(self) -> None:
        self.queue.write(self.keys)


def review_sink(context: RunContext) -> Sink | None:
    return None if context.options.review is None else ReviewSink(context)
