"""`segcli eval`: COCO metrics of predictions against a ground truth, computed by pycocotools.

The scoring is pycocotools' own `COCOeval` (evaluate, accumulate, summarize) on the results list
`COCO.loadRes` builds, so every number is the one pycocotools gives by hand on the same files.
This module turns the outcome into the report (`{"segm": {...}, "bbox": {...}, "per_class":
{...}}`), and runs the command: predict first when asked, score, print tables, write the report
and the precision-recall plots.

Python API (used by training for its validation AP):
    evaluate_files(gt_path, predictions)  -> report dict     (files, or a parsed results list)
    evaluate_coco(gt_coco, results)       -> report dict     (in memory)
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TextIO

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segcli.atomic import atomic_write
from segcli.evaluate.metrics import IOU_TYPES, STAT_NAMES
from segcli.evaluate.ground_truth import GroundTruth, load_ground_truth
from segcli.evaluate.inputs import pycocotools_output
from segcli.evaluate.results import Results, load_results, normalize_results
from segcli.evaluate.parallel import default_workers, run_cocoeval
from segcli.errors import UsageError
from segcli.paths_guard import Output, file_inputs, refuse_overwrites
from segcli.text import escaped, plural

# Settings `segcli eval --images` predicts with: what COCO evaluation expects of a detector.
EVAL_SCORE_THR = 0.05
EVAL_MAX_DET = 100


@dataclass
class Evaluation:
    """The report, the COCOeval objects behind it (for plots), and what was reported on the way."""

    report: dict
    evals: dict[str, COCOeval]
    warnings: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # iou type -> why it could not run


def parse_iou_types(value: str | Iterable[str]) -> tuple[str, ...]:
    """`"segm,bbox"` or a sequence of names -> a tuple of known IoU types, in order, no repeats."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(name).strip().lower() for name in names if str(name).strip()]
    if not names:
        raise UsageError("--iou-type: give segm, bbox or segm,bbox")
    unknown = [name for name in names if name not in IOU_TYPES]
    if unknown:
        raise UsageError(f"--iou-type {unknown[0]!r}: choose segm, bbox or segm,bbox")
    return tuple(dict.fromkeys(names))


def evaluate_files(gt: str | Path, predictions: str | Path | list[dict] | dict,
                   iou_types: str | Sequence[str] = IOU_TYPES, quiet: bool = True, workers: int | None = None) -> dict:
    """Score predictions (a file `segcli predict` writes, a results list file, or such a list or
    dict already parsed) against the COCO ground truth file `gt`; return the `--report` dict.

    Raises UsageError for unusable inputs. `quiet=False` lets pycocotools print its own summary,
    on stderr. `workers`: processes for pycocotools' per-image work (None: by size and CPUs; the
    numbers do not depend on it)."""
    return run_evaluation_files(gt, predictions, iou_types, quiet, workers).report


def evaluate_coco(gt: COCO, results: list[dict], iou_types: str | Sequence[str] = IOU_TYPES,
                  quiet: bool = True, workers: int = 1) -> dict:
    """Score an in-memory results list (`[{"image_id", "category_id", "score", "bbox",
    "segmentation"}]`, ground-truth ids; RLE, polygon or no masks) against a pycocotools COCO.

    For a trainer's validation pass: `gt` is built once (`COCO()` with `.dataset` set and
    `createIndex()`, or `load_ground_truth(path).coco`) and reused; `results` is not modified.
    Note that pycocotools' COCOeval converts `gt`'s polygons to RLE in place, as it always does.
    Results for images or categories `gt` does not have are left out. `workers > 1` forks that
    many processes for pycocotools' per-image work (same numbers); the default stays in-process,
    the safe choice inside a training process (CUDA, data-loader workers)."""
    iou_types = parse_iou_types(iou_types)
    results_ = normalize_results(gt, results)
    return evaluate(GroundTruth(gt), results_, iou_types, quiet, workers=workers).report


def run_evaluation_files(gt: str | Path, predictions: str | Path | list[dict] | dict,
                         iou_types: str | Sequence[str] = IOU_TYPES, quiet: bool = True,
                         workers: int | None = None) -> Evaluation:
    iou_types = parse_iou_types(iou_types)
    with _without_cycle_collection():
        truth = load_ground_truth(gt)
        results = load_results(truth.coco, predictions)
        return evaluate(truth, results, iou_types, quiet, workers=workers)


def evaluate(truth: GroundTruth, results: Results, iou_types: Sequence[str], quiet: bool = True,
             stderr: TextIO | None = None, workers: int | None = 1) -> Evaluation:
    """Run COCOeval for each IoU type that can run; the others are explained in `skipped`.

    segm needs a mask on every prediction and every ground-truth annotation (pycocotools would
    otherwise score a prediction's box as its mask): without them it is skipped when bbox is
    also asked for, and a UsageError when segm is all that was asked for."""
    warnings = list(truth.warnings) + list(results.warnings)
    skipped: dict[str, str] = {}
    if "segm" in iou_types:
        reason = None
        if not results.has_masks:
            reason = (f"{results.without_masks} of {len(results.results)} predictions have no mask (segmentation);"
                      " segm evaluation cannot run")
        elif not truth.has_masks:
            reason = "some ground-truth annotations have no mask (segmentation); segm evaluation cannot run"
        if reason:
            if list(iou_types) == ["segm"]:
                raise UsageError(reason)
            skipped["segm"] = reason
            warnings.append(reason + "; scoring bbox only")
    runnable = [t for t in iou_types if t not in skipped]
    evals: dict[str, COCOeval] = {}
    if workers is None:
        workers = default_workers(len(truth.coco.imgs))
    with pycocotools_output(quiet, stderr), _without_cycle_collection():
        detections = _load_res(truth.coco, results.results)
        for iou_type in runnable:
            evals[iou_type] = run_cocoeval(truth.coco, detections, iou_type, workers)
    return Evaluation(build_report(truth.coco, evals), evals, warnings, skipped)


@contextlib.contextmanager
def _without_cycle_collection() -> Iterator[None]:
    """Python's cycle collector off while COCO files are read and pycocotools runs.

    Both make hundreds of thousands of small dicts, lists and arrays, which makes the collector
    walk every live object again and again (a sixth of an evaluation's CPU time, measured), though
    they form no cycles and are freed by reference counting anyway. Numbers are unaffected."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _load_res(gt: COCO, results: list[dict]) -> COCO:
    if results:
        return gt.loadRes(results)
    # loadRes cannot take an empty list (it looks at the first result); no predictions is a valid
    # outcome to score: every ground-truth object is missed.
    detections = COCO()
    detections.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                          "annotations": []}
    detections.createIndex()
    return detections


def build_report(gt: COCO, evals: dict[str, COCOeval]) -> dict:
    """`{iou_type: {stat: value}, "per_class": {iou_type: {name: AP}}}` from finished COCOevals.

    A class's AP is the mean of its precision over IoU thresholds and recall points (all areas,
    100 detections), the entries pycocotools averages into AP. Classes without ground truth in the
    evaluated images have no AP (pycocotools marks them -1) and are left out of per_class."""
    report: dict = {iou_type: dict(zip(STAT_NAMES, (float(v) for v in evaluator.stats)))
                    for iou_type, evaluator in evals.items()}
    names = class_names(gt)
    report["per_class"] = {iou_type: per_class_ap(evaluator, names) for iou_type, evaluator in evals.items()}
    return report


def per_class_ap(evaluator: COCOeval, names: dict[int, str]) -> dict[str, float]:
    precision = evaluator.eval["precision"]  # [IoU thresholds, recall points, classes, areas, max dets]
    values: dict[str, float] = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        entries = precision[:, :, k, 0, -1]
        entries = entries[entries > -1]
        if entries.size:
            values[names[category_id]] = float(np.mean(entries))
    return values


def class_names(gt: COCO) -> dict[int, str]:
    """Category id -> a unique display name (a repeated name gets its id appended)."""
    names = {cid: str(category.get("name") or cid) for cid, category in gt.cats.items()}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {cid: (f"{name} (id {cid})" if counts[name] > 1 else name) for cid, name in names.items()}


def instance_counts(gt: COCO) -> dict[str, int]:
    """Non-crowd ground-truth objects per class name (what a class's recall is measured against)."""
    names = class_names(gt)
    counts = {name: 0 for name in names.values()}
    for ann in gt.dataset["annotations"]:
        if ann.get("image_id") in gt.imgs and ann.get("category_id") in names and not ann.get("iscrowd"):
            counts[names[ann["category_id"]]] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class EvalOptions:
    gt: str
    pred: str | None = None
    images: str | None = None
    weights: str | None = None  # with --images; None: "coco"
    arch: str | None = None
    device: str = "auto"
    save_pred: str | None = None
    iou_type: str = "segm,bbox"
    report: str | None = None  # "-": JSON on stdout instead of the tables
    plots: str | None = None
    workers: int | None = None  # processes for pycocotools' per-image work; None: by size and CPUs
    quiet: bool = False


@dataclass
class EvalOutcome:
    evaluation: Evaluation
    failed_inputs: list[tuple[str, str]] = field(default_factory=list)  # images predict could not read


def run_eval(options: EvalOptions, stdout: TextIO | None = None, stderr: TextIO | None = None) -> EvalOutcome:
    """Run `segcli eval`; raises SegcliError for user errors, before anything is written."""
    from segcli.evaluate.tables import print_tables

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    warn = (lambda message: None) if options.quiet else (lambda message: print(f"warning: {escaped(message)}", file=stderr))
    iou_types = parse_iou_types(options.iou_type)
    _check_flags(options)
    with _without_cycle_collection():
        truth = load_ground_truth(options.gt)
    failed: list[tuple[str, str]] = []
    if options.images is not None:
        results, failed = _predict_then_load(options, truth.coco, stderr)
    else:
        with _without_cycle_collection():
            results = load_results(truth.coco, options.pred)
    with _without_cycle_collection():
        evaluation = evaluate(truth, results, iou_types, quiet=True, workers=options.workers)
    for message in evaluation.warnings:
        warn(message)
    if failed:  # predict said `warning: skipped PATH: REASON` for each, also with --quiet (exit code 1)
        warn(f"the ground truth of {plural(len(failed), 'unreadable image')} counts as missed")
    if results.missed_images:
        warn(f"{results.missed_images} of {len(truth.coco.imgs)} ground-truth images have no predictions "
             "(their objects count as missed)")
    if not results.results:
        warn("there are no predictions to score")

    # Files first: if one cannot be written, the run fails before printing results it did not keep.
    if options.report not in (None, "-"):
        try:
            with atomic_write(options.report) as handle:
                json.dump(evaluation.report, handle, indent=2)
                handle.write("\n")
        except OSError as error:
            raise UsageError(f"--report {options.report}: cannot write ({error.strerror or error})")
    if options.plots is not None:
        from segcli.evaluate.plots import write_pr_plots

        try:
            written = write_pr_plots(evaluation.evals, Path(options.plots))
        except OSError as error:
            raise UsageError(f"--plots {options.plots}: cannot write ({error.strerror or error})")
        for path in written:
            if not options.quiet:
                print(f"segcli: wrote {path}", file=stderr)
    if options.report == "-":
        stdout.write(json.dumps(evaluation.report, indent=2) + "\n")
        stdout.flush()
        print_tables(evaluation.report, instance_counts(truth.coco), stderr)
    else:
        print_tables(evaluation.report, instance_counts(truth.coco), stdout)
    return EvalOutcome(evaluation, failed)


def _check_flags(options: EvalOptions) -> None:
    """Everything about the flags that can be wrong, checked before any slow work."""
    if (options.pred is None) == (options.images is None):
        raise UsageError("give either --pred FILE (predictions to score) or --images DIR (predict, then score)")
    if options.images is None:
        for flag, value in (("--weights", options.weights), ("--arch", options.arch), ("--save-pred", options.save_pred)):
            if value is not None:
                raise UsageError(f"{flag} goes with --images DIR (predict first); with --pred there is nothing to predict")
    elif not Path(options.images).is_dir():
        raise UsageError(f"--images {options.images}: no such folder")
    for flag, value in (("--report", options.report), ("--save-pred", options.save_pred)):
        if value not in (None, "-") and Path(value).is_dir():
            raise UsageError(f"{flag} {value}: is a folder; give a file name such as {flag[2:]}.json")
    if options.workers is not None and options.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {options.workers}")
    if options.save_pred == "-":
        raise UsageError("--save-pred needs a file name (stdout carries the tables)")
    if options.plots is not None and Path(options.plots).exists() and not Path(options.plots).is_dir():
        raise UsageError(f"--plots {options.plots}: is a file; give a folder for the PNG files")
    _refuse_overwrites(options)


def _refuse_overwrites(options: EvalOptions) -> None:
    """No output may replace the ground truth, the predictions, an image or another output."""
    from segcli.data.sources import expand_sources

    inputs = file_inputs("--gt", [options.gt]) + file_inputs("--pred", [options.pred])
    inputs += file_inputs("--weights", [options.weights])
    if options.images is not None:
        inputs += [("the image", item.path) for item in expand_sources([options.images])]
    outputs = [Output(flag, Path(value)) for flag, value in (("--report", options.report), ("--save-pred", options.save_pred))
               if value not in (None, "-")]
    if options.plots is not None:
        from segcli.evaluate.plots import plot_path

        outputs.append(Output("--plots", Path(options.plots), folder=True))
        outputs += [Output("--plots", plot_path(Path(options.plots), iou_type), given=options.plots) for iou_type in IOU_TYPES]
    refuse_overwrites(inputs, outputs)


def _predict_then_load(options: EvalOptions, gt: COCO, stderr: TextIO) -> tuple[Results, list[tuple[str, str]]]:
    """Predict the images folder into a COCO file (kept with --save-pred), then read it back."""
    from segcli.predict.options import PredictOptions
    from segcli.predict.run import run_predict

    with tempfile.TemporaryDirectory(prefix="segcli-eval-") as folder:
        out = options.save_pred or str(Path(folder) / "predictions.json")
        if not options.quiet:
            print(f"segcli: predicting {options.images} (score > {EVAL_SCORE_THR}, at most {EVAL_MAX_DET} per image)",
                  file=stderr)
        summary = run_predict(PredictOptions(
            sources=[options.images], out=out, weights=options.weights or "coco", arch=options.arch,
            device=options.device, score_thr=EVAL_SCORE_THR, max_det=EVAL_MAX_DET, format="coco", quiet=True,
            # quiet keeps predict's own summary and warnings off (eval reports them); the bar stays
            # on a terminal, since predicting a folder is the slow part.
            progress=stderr.isatty() and not options.quiet,
        ), stderr=stderr)
        if not options.quiet:
            print(f"segcli: {plural(summary.images, 'image')}, {plural(summary.detections, 'detection')} in "
                  f"{summary.seconds:.1f} s", file=stderr)
        return load_results(gt, out, where=f"predictions of --images {options.images}"), list(summary.failures)
