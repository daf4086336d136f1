"""Where a run's results go, decided from the options before any work: the format (given, or
inferred from --out), the output file or folder, the resume state folder; and the refusal to start
when an output would overwrite an input or another output."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from segcli.data.sources import InputItem
from segcli.errors import UsageError
from segcli.paths_guard import Output, file_inputs, refuse_overwrites
from segcli.predict.formats import FORMATS, format_from_suffix
from segcli.predict.options import PredictOptions
from segcli.writers.journal import state_dir_for

MASK_ENCODINGS = ("rle", "polygon")


@dataclass
class OutputPlan:
    """Where and how results go, decided from the options before any work."""

    format: str
    out: Path | None  # None: stdout
    per_image: bool  # one file per image under the folder `out`
    polygons: bool  # records carry polygons (polygon formats, or --masks polygon)
    state_dir: Path | None  # resume manifest, journal and lock; None for stdout


def plan_output(options: PredictOptions) -> OutputPlan:
    """Validate --out/--format/--masks and infer the format: jsonl on stdout; from the extension of
    a file (.json coco, .jsonl/.ndjson jsonl, .geojson geojson, .xml cvat); labelme for a folder."""
    to_stdout = options.out in (None, "-")
    out = None if to_stdout else Path(options.out)
    names_folder = out is not None and (out.is_dir() or str(options.out).endswith(("/", os.sep)))
    fmt = options.format
    if fmt is None:
        if out is None:
            fmt = "jsonl"
        elif names_folder:
            fmt = "labelme"
        elif (fmt := format_from_suffix(out.suffix)) is None:
            raise UsageError(f"cannot tell the output format from --out {options.out!r}; pass --format "
                             f"({', '.join(FORMATS)}) or end a folder name with /")
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if options.masks not in MASK_ENCODINGS:
        raise UsageError(f"--masks {options.masks!r}: choose rle or polygon")
    if options.poly_tolerance < 0:
        raise UsageError(f"--poly-tolerance must be >= 0 pixels, got {options.poly_tolerance}")
    if options.vid_stride < 1:
        raise UsageError(f"--vid-stride must be at least 1, got {options.vid_stride}")
    per_image = FORMATS[fmt].per_image
    if per_image:
        if out is None:
            raise UsageError(f"--format {fmt} writes one file per image: give a folder as --out")
        if (out.exists() and not out.is_dir()) or (not out.exists() and format_from_suffix(out.suffix) is not None):
            raise UsageError(f"--format {fmt} writes one file per image: --out {options.out!r} is a file, give a folder")
    elif out is not None and out.is_dir():
        raise UsageError(f"--out {options.out!r} is a folder; give a file name such as preds.json for --format {fmt}")
    if options.overlay is not None and Path(options.overlay).exists() and not Path(options.overlay).is_dir():
        raise UsageError(f"--overlay {options.overlay!r} is a file; give a folder")
    if options.resume and out is None:
        raise UsageError("--resume needs --out: a run that writes to stdout has nothing to resume")
    polygons = FORMATS[fmt].polygons or (options.masks == "polygon" and not per_image)
    state_dir = None if out is None else state_dir_for(out, per_image)
    return OutputPlan(fmt, out, per_image, polygons, state_dir)


def refuse_overwrites_of(options: PredictOptions, plan: OutputPlan, items: list[InputItem], stems: list[str]) -> None:
    """Stop before any work if an output would replace an input (`--out a.jpg`, an overlay of
    `photos/a.jpg` into `photos/`, a per-image file named like an input) or another output, or
    if the format cannot hold the inputs (a CVAT task is images or one video)."""
    inputs = [("the input", item.path) for item in items]
    inputs += file_inputs("the SOURCE", options.sources) + file_inputs("--weights", [options.weights])
    outputs, files = [], []
    if plan.out is not None:
        outputs.append(Output("--out", plan.out, folder=plan.per_image))
    if plan.per_image:
        fmt = FORMATS[plan.format]
        files = [Output("--out", plan.out / (stem + suffix), given=options.out)
                 for item, stem in zip(items, stems) if not item.is_video for suffix in fmt.suffixes]
        files += [Output("--out", plan.out / name, given=options.out) for name in fmt.extra_files]
    if options.review is not None:
        outputs.append(Output("--review", Path(options.review.path)))
    if options.overlay is not None:
        root = Path(options.overlay)
        outputs.append(Output("--overlay", root, folder=True))
        files += [Output("--overlay", root / (stem + suffix), given=options.overlay) for item, stem in zip(items, stems)
                  for suffix in ((".mp4", ".avi") if item.is_video else (".jpg",))]
    refuse_overwrites(inputs, outputs, files)
    refuse_inputs = getattr(FORMATS[plan.format], "refuse_inputs", None)
    if refuse_inputs is not None:
        refuse_inputs(items)
