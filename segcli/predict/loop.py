"""The run loop: decoded inputs -> batches -> the predictor -> stages -> sinks.

The loop knows three kinds of event and nothing about features:
- a result (one image, or one video frame): each stage transforms it in order (cut candidates,
  build the record, add track ids...), then each sink takes it (journal, per-image files,
  overlays, stdout lines, the review queue...);
- an input done (an image after its result, a video after its last frame): sinks finish what they
  hold for it and name the files they wrote, which the last sink, the journal, records;
- an input failed: stages and sinks drop what they hold for it.
At the end (and on Ctrl-C, so that what is done is a valid output) every sink finishes; when the
run cannot complete (interrupted, or the reader of stdout left) sinks first drop what they cannot
finish. Which stages and sinks a run has is decided once, in segcli.predict.pipeline.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from segcli import __version__
from segcli.data.decode import Decoded, InputDone, iter_decoded
from segcli.data.sources import InputItem
from segcli.predict.core import ImagePrediction, batches
from segcli.predict.options import PredictOptions, PredictSummary
from segcli.predict.plan import OutputPlan
from segcli.predict.streams import predicted
from segcli.progress import Progress
from segcli.text import escaped
from segcli.writers.journal import Signature


@dataclass
class Result:
    """One image's or video frame's result on its way through the stages to the sinks."""

    index: int  # position of its input in the run's list
    key: str  # the input's identity in the resume journal
    item: InputItem
    stem: str  # output file names' stem of its input
    decoded: Decoded | None  # the pixels (None on Ray: they stay on the actors)
    found: ImagePrediction  # everything the model returned (candidates below --score-thr too)
    prediction: ImagePrediction  # what the outputs hold (a stage may cut `found` down)
    record: dict | None = None  # the output record, made by the record stage


@dataclass
class Finished:
    """An input is complete: its files (absolute paths) as the sinks name them, in order."""

    index: int
    key: str
    item: InputItem
    stem: str
    signature: Signature | None
    video: bool  # a video after its last frame (else an image after its result)
    files: list[str] = field(default_factory=list)


class Stage:
    """Transforms results before any sink sees them. Every hook is optional."""

    def predictor_for_run(self, predictor):
        """The predictor the run calls: this one, or a wrapper (--review-flip mirrors images too)."""
        return predictor

    def on_result(self, result: Result) -> None:
        pass

    def on_input_done(self, index: int) -> None:
        pass

    def on_failed(self, index: int) -> None:
        pass


class Sink:
    """Takes results and writes them somewhere. Every hook is optional; hooks that write files
    return their absolute paths, for the resume journal."""

    def predictor_for_run(self, predictor):
        """The predictor the run calls: this one, or a wrapper (--review-flip mirrors images too)."""
        return predictor

    def on_result(self, result: Result) -> list[str]:
        return []

    def on_input_done(self, done: Finished) -> list[str]:
        return []

    def on_failed(self, index: int, key: str) -> None:
        pass

    def abort(self) -> None:
        """The run stops early: drop what cannot be finished (half-written videos)."""

    def finish(self) -> None:
        """The end of the run, also after Ctrl-C: write what is assembled from all inputs."""


@dataclass
class RunContext:
    """What stages and sinks are built from: the run's settings, inputs and journal."""

    options: PredictOptions
    plan: OutputPlan
    predictor: object  # a Predictor, or a wrapper of one (slicing, mirroring)
    items: list[InputItem]
    stems: list[str]
    keys: list[str]
    todo: list[int]  # positions in `items` this run predicts (the rest: done by an earlier run)
    journal: object | None  # segcli.writers.journal.Journal
    stderr: TextIO

    @property
    def categories(self) -> list[dict]:
        return self.predictor.checkpoint.categories

    @property
    def info(self) -> dict:
        """What the one-file formats say about the run in their headers."""
        options = self.options
        return {
            "description": "segcli predictions",
            "version": __version__,
            "weights": options.weights,
            "arch": self.predictor.checkpoint.arch,
            "score_thr": options.score_thr,
            "max_det": options.max_det,
        }

    def warn(self, message: str, always: bool = False) -> None:
        """One `warning:` line (odd characters of file names escaped); `always`: also with --quiet,
        for failed inputs, since the exit code (1) then says that something is wrong."""
        if always or not self.options.quiet:
            print(f"warning: {escaped(message)}", file=self.stderr)


class RunLoop:
    """Feeds one run's events through its stages and sinks and counts what happened."""

    def __init__(self, context: RunContext, stages: list[Stage], sinks: list[Sink]) -> None:
        self.context, self.stages, self.sinks = context, stages, sinks
        self.summary = PredictSummary()
        self.signatures = {i: Signature.of(context.items[i].path) for i in context.todo}
        self.files: dict[int, list[str]] = {}  # files written so far for each unfinished input

    def go(self, show_progress: bool) -> PredictSummary:
        """Decode, batch and predict every input of `todo` in this process."""
        started = time.perf_counter()
        context, options = self.context, self.context.options
        predictor = context.predictor
        batch_size = options.batch_size or (8 if predictor.device.type == "cuda" else 1)
        workers = options.workers if options.workers is not None else (1 if (os.cpu_count() or 1) <= 2 else 2)
        streams = options.streams or 1
        finished = 0
        with Progress(len(context.todo), enabled=show_progress, stream=context.stderr) as progress:
            decoded = iter_decoded([context.items[i] for i in context.todo], workers=workers,
                                   prefetch=max(8, 2 * batch_size), vid_stride=options.vid_stride)
            try:
                with self.stopping_early():
                    for event, results in predicted(batches(decoded, batch_size), predictor.predict, streams):
                        if isinstance(event, list):
                            for frame, found in zip(event, results):
                                finished += self.result(context.todo[frame.index], frame, found)
                        elif isinstance(event, InputDone):
                            finished += self.video_done(context.todo[event.index], event.note)
                        else:
                            finished += self.failed(context.todo[event.index], event.error)
                        progress.update(finished)
            finally:
                decoded.close()
        self.finish()
        self.summary.seconds = time.perf_counter() - started
        return self.summary

    @contextlib.contextmanager
    def stopping_early(self):
        """Ctrl-C: what is done so far becomes a valid output; the reader of stdout gone (`| head`):
        nothing more is written. Either way, sinks first drop what they cannot finish."""
        try:
            yield
        except (KeyboardInterrupt, BrokenPipeError) as stop:
            for sink in self.sinks:
                sink.abort()
            if isinstance(stop, KeyboardInterrupt):
                self.finish()
            raise

    def result(self, index: int, decoded: Decoded | None, found: ImagePrediction) -> int:
        """Handle one image or frame result; returns 1 when that completed an input."""
        context = self.context
        result = Result(index, context.keys[index], context.items[index], context.stems[index], decoded, found, found)
        for stage in self.stages:
            stage.on_result(result)
        files = self.files.setdefault(index, [])
        for sink in self.sinks:
            files += sink.on_result(result)
        self.summary.detections += len(result.record["instances"])
        if self.summary.first_result_at is None:
            self.summary.first_result_at = time.perf_counter()
        if found.frame is not None:
            self.summary.frames += 1
            return 0
        self.summary.images += 1
        self._done(index, video=False)
        return 1

    def video_done(self, index: int, note: str | None) -> int:
        if note:
            path = self.context.items[index].path
            self.summary.notes.append((str(path), note))
            self.context.warn(f"{path}: {note}")
        self._done(index, video=True)
        return 1

    def _done(self, index: int, video: bool) -> None:
        for stage in self.stages:
            stage.on_input_done(index)
        context = self.context
        done = Finished(index, context.keys[index], context.items[index], context.stems[index],
                        self.signatures.get(index), video, self.files.pop(index, []))
        for sink in self.sinks:  # in order: the journal, last, records every file the others wrote
            done.files += sink.on_input_done(done)

    def failed(self, index: int, reason: str) -> int:
        path = str(self.context.items[index].path)
        self.summary.failures.append((path, reason))
        self.context.warn(f"skipped {path}: {reason}", always=True)
        self.files.pop(index, None)
        for stage in self.stages:
            stage.on_failed(index)
        for sink in self.sinks:
            sink.on_failed(index, self.context.keys[index])
        return 1

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()


def absolute_paths(root: Path, relative: list[str]) -> list[str]:
    """Journal entries name written files absolutely: outputs and overlays live in different folders."""
    return [os.path.abspath(root / name) for name in relative]
