"""One process's prediction run: sources -> the plan, inputs and journal -> the model (with
--slice, wrapped by SlicedPredictor) -> the run loop with its stages and sinks
(segcli.predict.pipeline). With --ray the same loop is fed from Ray's actors (segcli.predict.ray);
with --shard it runs one slice of the inputs and leaves a part record for `segcli merge`
(segcli.predict.shards); under torchrun each rank runs this on its slice (segcli.predict.torchrun).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import TextIO

from segcli.data.sources import expand_sources
from segcli.paths_guard import first_missing
from segcli.predict.candidates import masks_above, model_threshold
from segcli.predict.core import Predictor
from segcli.predict.fingerprint import fingerprint
from segcli.predict.loop import RunContext
from segcli.predict.options import PredictOptions, PredictSummary
from segcli.predict.pipeline import build_loop
from segcli.predict.plan import OutputPlan, plan_output, refuse_overwrites_of
from segcli.predict.review import check_review_path
from segcli.predict.shards import ShardRun
from segcli.predict.slicing import SlicedPredictor, SliceSettings
from segcli.writers.journal import Journal
from segcli.writers.paths import output_stems


def run_single(options: PredictOptions, stdin: TextIO | None = None, stderr: TextIO | None = None) -> PredictSummary:
    """Run the prediction in this process (under torchrun: this rank's slice); raises SegcliError
    for user errors before any output is written."""
    stderr = stderr or sys.stderr
    plan = plan_output(options)
    slicing = SliceSettings.of(options)
    if options.track is not None:
        options.track.validate(options.score_thr)
    if options.review is not None:
        check_review_path(options.review)
    ignored: Counter[str] = Counter()
    items = expand_sources(options.sources, stdin=stdin, ignored=ignored)
    stems = output_stems(items)
    refuse_overwrites_of(options, plan, items, stems)
    keys = [json.dumps([os.path.realpath(item.path), item.file_name, stem], ensure_ascii=False)
            for item, stem in zip(items, stems)]
    # Names are given over the whole list first, so that every shard names its inputs as one run would.
    shard = ShardRun.of(options, plan, [item.file_name for item in items], stems)
    if shard is not None:
        plan, items, stems, keys = shard.plan, shard.span.take(items), shard.span.take(stems), shard.span.take(keys)
    created = first_missing(plan.state_dir) if plan.state_dir is not None else None
    if shard is not None and created is not None:
        created = plan.state_dir  # shards share the folders above it: another may be writing there
    show_progress = (stderr.isatty() and not options.quiet) if options.progress is None else options.progress
    with contextlib.ExitStack() as stack:
        journal = _open_journal(plan, options, stack)  # takes the lock: a second run stops here, at once
        if shard is not None:
            shard.begin()
        if journal is not None and options.resume:
            journal.keep_only(dict(zip(keys, (item.path for item in items))))
        todo = [i for i in range(len(items)) if journal is None or not journal.is_done(keys[i])]
        try:
            if options.ray is not None:
                from segcli.predict.ray import check_cluster, driver_model, run_on_ray

                predictor = driver_model(options, show_progress)  # Ray importable, the model loads here
                check_cluster(options)  # the address reachable: a wrong one is one line, not a hang
            else:
                predictor = Predictor.load(options.weights, options.arch, options.device, options.precision,
                                           model_threshold(options), options.max_det, progress=show_progress,
                                           classes=options.classes)
        except BaseException:
            if created is not None:  # a run that never started leaves no empty state folder behind
                shutil.rmtree(created, ignore_errors=True)
            raise
        if options.ray is not None:  # the actors slice with the same settings (ray_predict.ActorSettings)
            summary = run_on_ray(options, plan, predictor, items, stems, keys, todo, journal, stderr, show_progress)
        else:
            predictor.masks_above = masks_above(options)
            if slicing is not None:  # candidates below --score-thr are merged apart (SlicedPredictor.keep_thr)
                predictor = SlicedPredictor(predictor, slicing, options.max_det, options.batch_size,
                                            keep_thr=options.score_thr)
            context = RunContext(options, plan, predictor, items, stems, keys, todo, journal, stderr)
            summary = build_loop(context).go(show_progress)
        summary.reused = len(items) - len(todo)
        summary.ignored = ignored
        if shard is not None:
            shard.finish(journal, keys, fingerprint(options, plan))
        return summary


def _open_journal(plan: OutputPlan, options: PredictOptions, stack: contextlib.ExitStack) -> Journal | None:
    if plan.state_dir is not None:
        return stack.enter_context(Journal(plan.state_dir, fingerprint(options, plan), options.resume,
                                           output_root=plan.out if plan.per_image else None))
    if plan.format == "jsonl":
        return None  # lines go straight to stdout
    # One-file formats on stdout: results are kept in a private journal and printed at the end,
    # so a failed run never prints half a JSON document.
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="segcli-")))
    return stack.enter_context(Journal(folder, {}, resume=False))

