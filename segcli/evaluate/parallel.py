"""pycocotools' COCOeval with its per-image work spread over processes, same numbers bit for bit.

`COCOeval.evaluate()` spends nearly all of an evaluation's time in `computeIoU` and
`evaluateImg`, each a pure function of one (image, category) pair: nothing one image computes
reaches another. So the images are cut into contiguous chunks, each forked child runs pycocotools'
own `evaluate()` on its chunk, and the parent puts the per-image records back into the order
`evaluate()` makes them (category, then area range, then image) before pycocotools' own
`accumulate()` and `summarize()` run on them. Every number comes from pycocotools' code on the
same inputs in the same order, so the result is identical to a single-process run (tested). The
records handed back keep only what `accumulate()` reads (see `_pack`).

Forking is used only where it is cheap and safe: on platforms with `fork`, and for evaluations
large enough to repay starting processes.
"""

from __future__ import annotations

import copy
import multiprocessing
import os

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

MIN_IMAGES_PER_WORKER = 32  # below this a child's start-up costs more than its share of the work

_job: tuple[COCO, COCO, str, list] | None = None  # what forked children read (inherited, not pickled)


def default_workers(images: int) -> int:
    """How many processes an evaluation of `images` images is worth on this machine.

    One on two cores or fewer: the second core is rarely free (measured: with other jobs on a
    2-core machine the split costs 30% more CPU for no wall-clock gain), as for predict's
    decoding threads."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    if cpus <= 2:
        return 1
    return max(1, min(cpus, images // MIN_IMAGES_PER_WORKER))


def run_cocoeval(gt: COCO, detections: COCO, iou_type: str, workers: int = 1) -> COCOeval:
    """COCOeval evaluated, accumulated and summarized (printing as pycocotools does)."""
    evaluator = COCOeval(gt, detections, iou_type)
    image_ids = [int(i) for i in np.unique(evaluator.params.imgIds)]
    workers = min(workers, len(image_ids))
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        _evaluate_in_chunks(evaluator, image_ids, workers)
    else:
        evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def _evaluate_in_chunks(evaluator: COCOeval, image_ids: list[int], workers: int) -> None:
    """What `evaluator.evaluate()` does, with the images evaluated in `workers` forked children."""
    global _job
    chunks = [list(chunk) for chunk in np.array_split(np.asarray(image_ids), workers) if len(chunk)]
    _job = (evaluator.cocoGt, evaluator.cocoDt, evaluator.params.iouType, chunks)
    try:
        with multiprocessing.get_context("fork").Pool(len(chunks)) as pool:
            parts = pool.map(_evaluate_chunk, range(len(chunks)))
    finally:
        _job = None
    params = evaluator.params
    # The parameter normalization evaluate() does before it starts.
    params.imgIds = list(np.unique(params.imgIds))
    if params.useCats:
        params.catIds = list(np.unique(params.catIds))
    params.maxDets = sorted(params.maxDets)
    parts = [_unpack(part) for part in parts]
    blocks = (len(params.catIds) if params.useCats else 1) * len(params.areaRng)
    evaluator.evalImgs = [record for block in range(blocks) for part, chunk in zip(parts, chunks)
                          for record in part[block * len(chunk):(block + 1) * len(chunk)]]
    evaluator._paramsEval = copy.deepcopy(params)


def _evaluate_chunk(index: int) -> tuple:
    gt, detections, iou_type, chunks = _job
    evaluator = COCOeval(gt, detections, iou_type)
    evaluator.params.imgIds = chunks[index]
    evaluator.evaluate()
    return _pack(evaluator.evalImgs, len(evaluator.params.iouThrs))


# The per-image records travel as a few concatenated arrays: pickling 10^5 small dicts costs as much
# as computing them. Only what accumulate() reads is kept (dtScores, dtMatches, dtIgnore, gtIgnore);
# the values, dtypes and order are unchanged.
def _pack(records: list, thresholds: int) -> tuple:
    kept = [record for record in records if record is not None]
    present = np.array([record is not None for record in records], dtype=bool)
    detections = np.array([len(record["dtScores"]) for record in kept], dtype=np.int64)
    truths = np.array([len(record["gtIgnore"]) for record in kept], dtype=np.int64)
    if not kept:
        empty = np.zeros((thresholds, 0))
        return present, detections, truths, np.zeros(0), empty, empty.astype(bool), np.zeros(0)
    scores = np.concatenate([np.asarray(record["dtScores"], dtype=np.float64) for record in kept])
    matches = np.concatenate([record["dtMatches"] for record in kept], axis=1)
    ignore = np.concatenate([record["dtIgnore"] for record in kept], axis=1)
    truth_ignore = np.concatenate([np.asarray(record["gtIgnore"]) for record in kept])
    return present, detections, truths, scores, matches, ignore, truth_ignore


def _unpack(packed: tuple) -> list:
    present, detections, truths, scores, matches, ignore, truth_ignore = packed
    dt_end, gt_end = np.cumsum(detections).tolist(), np.cumsum(truths).tolist()
    records: list = []
    k = 0
    for here in present.tolist():
        if not here:
            records.append(None)
            continue
        d0, d1 = (dt_end[k - 1] if k else 0), dt_end[k]
        g0, g1 = (gt_end[k - 1] if k else 0), gt_end[k]
        records.append({"dtScores": scores[d0:d1], "dtMatches": matches[:, d0:d1], "dtIgnore": ignore[:, d0:d1],
                        "gtIgnore": truth_ignore[g0:g1]})
        k += 1
    return records
