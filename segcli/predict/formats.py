"""The output formats `--format` names, in one registry.

Two kinds:
- one-file formats are assembled at the end of the run from the resume journal, every finished
  input in input order, written atomically (or to stdout): `write(out, records, context)`;
- per-image formats write one file (or a few) per image as results come, into the folder --out:
  `writer(out, categories)` makes an object with `write(Target) -> [relative paths]`.

A new format is one module with its writer plus one `register(...)` line at the bottom of this file.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from segcli import __version__
from segcli.atomic import atomic_write
from segcli.errors import UsageError
from segcli.writers.coco import CocoWriter
from segcli.writers.geojson import write_geojson
from segcli.writers.jsonl import record_line
from segcli.writers.per_image import LabelMeWriter, PngWriter, YoloWriter

Records = Callable[[], Iterator[dict]]  # each call: the finished inputs' records again, in input order


@dataclass(frozen=True)
class OneFileFormat:
    name: str
    # write(out, records, context): out None means stdout; context is the run's RunContext
    # (categories, info, options, warn, scratch folder).
    write: Callable[[Path | None, Records, object], None]
    suffixes: tuple[str, ...] = ()  # --out extensions that choose this format without --format
    polygons: bool = False  # records always carry polygons (else --masks polygon decides)
    # refuse_inputs(items): raises UsageError, before any work, for inputs the format cannot hold
    refuse_inputs: Callable[[list], None] | None = None
    per_image = False


@dataclass(frozen=True)
class PerImageFormat:
    name: str
    writer: Callable[[Path, list[dict]], object]  # (out folder, categories) -> writer
    suffixes: tuple[str, ...]  # the files written for an image stem: stem + suffix
    extra_files: tuple[str, ...] = ()  # files of the whole folder (YOLO's data.yaml)
    polygons: bool = True  # records carry polygons
    pixel_centres: bool = True  # polygons traced through pixel centres (LabelMe's and YOLO's convention)
    per_image = True


FORMATS: dict[str, OneFileFormat | PerImageFormat] = {}


def register(fmt: OneFileFormat | PerImageFormat) -> None:
    FORMATS[fmt.name] = fmt


def format_from_suffix(suffix: str) -> str | None:
    return next((f.name for f in FORMATS.values() if suffix.lower() in f.suffixes), None)


@contextlib.contextmanager
def output_stream(out: Path | None):
    """The binary stream a one-file format writes to: `out` atomically, or stdout."""
    if out is not None:
        with atomic_write(out, "wb") as handle:
            yield handle
        return
    yield sys.stdout.buffer
    sys.stdout.buffer.flush()


def _coco(results_only: bool):
    def write(out: Path | None, records: Records, context) -> None:
        target = out if out is not None else Path(context.journal.dir) / "out.json"
        with CocoWriter(target, context.categories, results_only=results_only, info=context.info) as writer:
            for record in records():
                writer.add_record(record, polygons=context.options.masks == "polygon")
        if out is None:
            with open(target, "rb") as source:
                shutil.copyfileobj(source, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
    return write


def _jsonl(out: Path | None, records: Records, context) -> None:
    with output_stream(out) as handle:
        for record in records():
            handle.write(record_line(record))


def _geojson(out: Path | None, records: Records, context) -> None:
    # GeoJSON of georeferenced TIFFs is in their own CRS: the record stage reads it (records.py).
    with output_stream(out) as handle:
        write_geojson(handle, records, context.info, context.warn)


def _label_studio(out: Path | None, records: Records, context) -> None:
    import urllib.parse

    from segcli.writers.label_studio import write_label_studio

    prefix = context.options.image_url_prefix
    paths = {item.file_name: item.path for item in context.items}

    def url(file_name: str) -> str:
        if prefix:
            return prefix + urllib.parse.quote(file_name)
        # Label Studio's local files, served when LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT is /.
        path = Path(paths.get(file_name, file_name)).resolve()
        return "/data/local-files/?d=" + urllib.parse.quote(path.as_posix().lstrip("/"))

    shape = "polygon" if context.options.masks == "polygon" else "brush"
    with output_stream(out) as handle:
        write_label_studio(handle, records(), context.categories, url, shape, "segcli " + __version__)


def _images_only(items: list) -> None:
    videos = [item.file_name for item in items if item.is_video]
    if videos:
        raise UsageError(f"--format label-studio: {videos[0]!r} is a video; Label Studio tasks show images "
                         "(extract frames first, or write --format cvat, which holds a video's tracks)")


def _cvat(out: Path | None, records: Records, context) -> None:
    from segcli.writers.cvat import write_cvat

    with output_stream(out) as handle:
        write_cvat(handle, records(), context.categories, context.options.masks == "polygon", context.warn)


def _refuse_cvat_inputs(items: list) -> None:
    from segcli.writers.cvat import refuse_unfit_inputs

    refuse_unfit_inputs(items)


register(OneFileFormat("coco", _coco(results_only=False), suffixes=(".json",)))
register(OneFileFormat("coco-results", _coco(results_only=True)))
register(OneFileFormat("jsonl", _jsonl, suffixes=(".jsonl", ".ndjson")))
register(OneFileFormat("geojson", _geojson, suffixes=(".geojson",), polygons=True))
register(PerImageFormat("labelme", lambda out, categories: LabelMeWriter(out), (LabelMeWriter.suffix,),
                        pixel_centres=LabelMeWriter.pixel_centres))
register(PerImageFormat("yolo", YoloWriter, (YoloWriter.suffix,), extra_files=("data.yaml",),
                        pixel_centres=YoloWriter.pixel_centres))
register(PerImageFormat("png", PngWriter, PngWriter.suffixes, polygons=False, pixel_centres=PngWriter.pixel_centres))
register(OneFileFormat("label-studio", _label_studio, refuse_inputs=_images_only))
register(OneFileFormat("cvat", _cvat, suffixes=(".xml",), refuse_inputs=_refuse_cvat_inputs))
