"""A run's fingerprint: every setting that changes what it writes. `--resume` refuses an output
made with another fingerprint, and shard part records carry it so `segcli merge` refuses foreign
parts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from segcli.device import resolve_device, resolve_precision
from segcli.predict.options import PredictOptions
from segcli.predict.plan import OutputPlan
from segcli.predict.slicing import SliceSettings


def fingerprint(options: PredictOptions, plan: OutputPlan) -> dict:
    """Everything that changes what a run writes; --resume refuses an output made with another."""
    try:
        precision = resolve_precision(options.precision, resolve_device(options.device))
    except Exception:  # reported properly by Predictor.load
        precision = options.precision
    settings = {
        "weights": _weights_identity(options.weights),
        "arch": options.arch,
        "precision": str(precision),
        "format": plan.format,
        "masks": options.masks if not plan.per_image else None,
        "poly_tolerance": options.poly_tolerance if plan.polygons else None,
        "score_thr": options.score_thr,
        "max_det": options.max_det,
        "classes": sorted(str(c).strip().casefold() for spec in options.classes or [] for c in str(spec).split(",") if c.strip()),
        "vid_stride": options.vid_stride,
        "overlay": os.path.abspath(options.overlay) if options.overlay else None,
        "slice": None if (slicing := SliceSettings.of(options)) is None else slicing.fingerprint(),
    }
    # Only when on, so that outputs made before these options existed still resume.
    if options.track is not None:
        settings["track"] = options.track.fingerprint()
    if options.review is not None:
        settings["review"] = options.review.fingerprint()
    return settings


def _weights_identity(spec: str) -> str:
    """A local checkpoint by its content (a retrained file at the same path is another model);
    a registry name or URL by name (registry files are checksum-verified)."""
    path = Path(spec)
    if not path.is_file():
        return spec
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
