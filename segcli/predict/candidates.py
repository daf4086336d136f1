"""Detections below `--score-thr`, for the features that need them: `--track`'s second stage and
`--review`'s near-threshold count.

The model then runs with the lower threshold, and each result is cut back to the detections above
`--score-thr` before any format sees it. A box can only be suppressed by a higher-scoring box, so
lowering the threshold (applied before NMS, see segcli.model.roi_heads) leaves the detections above
`--score-thr` exactly as they were: every output holds the same instances with or without these
features. What it costs is mask work on the extra detections (benchmarks/track_review_cost.py),
and only for `--track`, whose second stage compares the candidates' masks: `--review` reads their
scores alone, so with `--review` only the model gives them no mask (`masks_above`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from segcli.predict.review import REVIEW_BAND

if TYPE_CHECKING:
    from segcli.predict.options import PredictOptions


def model_threshold(options: PredictOptions) -> float:
    """The score threshold the model runs with: `--score-thr`, or lower when
    `--track` or `--review` need candidates below it. Exported models keep `--score-thr` (their
    files were made with a threshold of their own, which they cannot go below); an invalid
    `--score-thr` is passed on unchanged, for the model loader to report as given."""
    from segcli.export.runtime import exported_format

    score_thr = options.score_thr
    if options.track is None and options.review is None:
        return score_thr
    if not 0.0 <= score_thr <= 1.0 or exported_format(options.weights) is not None:
        return score_thr
    floor = score_thr
    if options.track is not None:
        floor = min(floor, options.track.low_thr)
    if options.review is not None:
        floor = min(floor, score_thr - REVIEW_BAND)
    return max(floor, 0.0)


def masks_above(options: PredictOptions) -> float | None:
    """The score at or below which detections need no mask (Predictor.masks_above), or None
    when every detection the model returns needs one."""
    if options.track is not None or model_threshold(options) >= options.score_thr:
        return None
    return options.score_thr


