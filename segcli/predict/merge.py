"""`segcli merge PART... --out FILE`: the parts of a sharded run become the file one process over
every input writes, byte for byte.

Each part is a plain output file (COCO, coco-results, JSON Lines, GeoJSON) of a contiguous run of
the input list, with a part record beside it (segcli.predict.shards) saying which run, what made
it and how many images it holds. Parts are put in input order and joined; COCO image and
annotation ids (and the results list's image ids) are shifted by the counts of the parts before,
which gives exactly the ids one process numbers in input order. Everything else (info,
categories, the GeoJSON header) is the same in every part and written once.

Parts are read one item at a time (segcli.data.json_stream), so memory does not grow with them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

from segcli.atomic import atomic_write
from segcli.data.json_stream import JsonStream, JsonStreamError
from segcli.predict.shards import PART_SUFFIX, PartRecord, Span, forget_record, read_record, write_record
from segcli.errors import UsageError
from segcli.writers.coco import _json as coco_json  # the COCO writer's own encoding: same bytes as one run
from segcli.writers.geojson import GeoJsonWriter

MERGEABLE = ("coco", "coco-results", "jsonl", "geojson")
PER_IMAGE_NOTE = ("per-image formats (labelme, yolo, png) need no merge: give every shard the same --out "
                  "folder and the files land side by side")


@dataclass
class Part:
    path: Path
    record: PartRecord


@dataclass
class MergeSummary:
    parts: int
    inputs: int  # inputs the merged file covers
    records: int  # images and video frames in it
    format: str
    out: Path
    seconds: float


def merge_parts(paths: Sequence[str | os.PathLike], out: str | os.PathLike, allow_partial: bool = False,
                label: str | None = None) -> MergeSummary:
    """Merge the parts at `paths` into `out` (written atomically).

    The parts must come from one input list, one model and the same settings, and together hold
    every input; else a UsageError says what differs or what is missing. With `allow_partial`
    (torchrun ranks inside one `--shard` job) they may cover a contiguous run of the inputs only:
    `out` is then itself a part, with its own record, labelled `label`.
    """
    started = time.perf_counter()
    parts = _check(_read_parts(paths), allow_partial)
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out '{out}' is a folder; give the merged file's name")
    if any(os.path.realpath(out) == os.path.realpath(part.path) for part in parts):
        raise UsageError(f"--out '{out}' is one of the parts; give the merged file another name")
    fmt = parts[0].record.format
    try:
        with atomic_write(out, "wb") as handle:
            {"coco": _merge_coco, "coco-results": _merge_results, "jsonl": _merge_lines,
             "geojson": _merge_geojson}[fmt](parts, handle)
    except (JsonStreamError, UnicodeDecodeError) as exc:
        raise UsageError(f"a part is not the file its record describes ({exc}); rerun that shard") from None
    first, last = parts[0].record.span, parts[-1].record.span
    span = Span(first.start, last.stop, first.total, first.digest)
    records = sum(part.record.records for part in parts)
    if span.whole:
        forget_record(out)  # a record left beside an older `out` described another file
    else:
        write_record(out, span, label or span.describe(), fmt, parts[0].record.fingerprint, records)
    return MergeSummary(len(parts), span.stop - span.start, records, fmt, out, time.perf_counter() - started)


def _read_parts(paths: Sequence[str | os.PathLike]) -> list[Part]:
    given = [Path(p) for p in paths]
    if not given:
        raise UsageError("give the parts to merge")
    names = {os.path.realpath(p) for p in given}
    parts, seen = [], set()
    for path in given:
        if path.is_dir():
            raise UsageError(f"'{path}' is a folder: {PER_IMAGE_NOTE}")
        if path.name.endswith(PART_SUFFIX):
            if os.path.realpath(path.with_name(path.name[:-len(PART_SUFFIX)])) in names:
                continue  # `segcli merge out/part-*` also names the records; their parts are given
            raise UsageError(f"'{path}' is a part record; give the part it describes "
                             f"('{path.name[:-len(PART_SUFFIX)]}')")
        if not path.is_file():
            raise UsageError(f"part '{path}' does not exist")
        if os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        parts.append(Part(path, read_record(path)))
    return parts


def _check(parts: list[Part], allow_partial: bool) -> list[Part]:
    """Same format, model, settings and input list; the spans tile the inputs. Returns the parts in input order."""
    first = parts[0]
    if first.record.format not in MERGEABLE:
        raise UsageError(f"'{first.path}' is a {first.record.format} part: {PER_IMAGE_NOTE}")
    for part in parts[1:]:
        if part.record.format != first.record.format:
            raise UsageError(f"parts of different formats: '{first.path}' is {first.record.format}, "
                             f"'{part.path}' is {part.record.format}")
        if part.record.fingerprint != first.record.fingerprint:
            a, b = first.record.fingerprint, part.record.fingerprint
            changed = "; ".join(f"{key} {a.get(key)!r} vs {b.get(key)!r}" for key in sorted(set(a) | set(b))
                                if a.get(key) != b.get(key))
            raise UsageError(f"parts made with different models or settings: '{first.path}' and '{part.path}' "
                             f"differ in {changed}")
        if (part.record.span.total, part.record.span.digest) != (first.record.span.total, first.record.span.digest):
            raise UsageError(f"parts made over different inputs: '{first.path}' was one of {first.record.span.total} "
                             f"inputs, '{part.path}' one of {part.record.span.total}"
                             + (" (same count, other names)" if part.record.span.total == first.record.span.total
                                else "") + "; run every shard over the same SOURCEs")
    parts = sorted(parts, key=lambda part: (part.record.span.start, part.record.span.stop))
    total = first.record.span.total
    cursor = parts[0].record.span.start if allow_partial else 0
    previous = None
    for part in parts:
        span = part.record.span
        if span.start > cursor:
            raise UsageError(f"inputs {cursor + 1}-{span.start} of {total} are in no part given"
                             + _missing_hint(parts))
        # Empty shards (more shards than inputs) share a position; only the same one twice is wrong.
        if span.start < cursor or (previous is not None and span == previous.record.span
                                   and part.record.shard == previous.record.shard):
            raise UsageError(f"'{previous.path}' and '{part.path}' hold the same inputs "
                             f"(shard {previous.record.shard} and shard {part.record.shard})")
        cursor, previous = span.stop, part
    if cursor < total and not allow_partial:
        raise UsageError(f"inputs {cursor + 1}-{total} of {total} are in no part given" + _missing_hint(parts))
    return parts


def _missing_hint(parts: list[Part]) -> str:
    shards = [part.record.shard for part in parts]
    return f" (the parts given are shards {', '.join(shards)})"


# -- per format ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _stream(part: Part) -> Iterator[JsonStream]:
    with open(part.path, encoding="utf-8") as handle:
        yield JsonStream(handle)


def _seek_member(stream: JsonStream, members: Iterator[str], wanted: str, part: Part) -> None:
    for key in members:
        if key == wanted:
            return
        stream.skip()
    raise JsonStreamError(f"'{part.path}' has no {wanted!r}")


def _merge_coco(parts: list[Part], out: IO[bytes]) -> None:
    """`{"info", "licenses", "images", "categories", "annotations"}` as the first part orders them;
    images and annotations from every part, ids shifted; the rest from the first part."""
    image_offsets, offset = [], 0
    for part in parts:
        image_offsets.append(offset)
        offset += part.record.records
    with _stream(parts[0]) as stream:
        out.write(b"{")
        for position, key in enumerate(stream.members()):
            out.write((b"," if position else b"") + coco_json(key) + b":")
            if key == "images":
                stream.skip()
                _write_array(out, _coco_images(parts, image_offsets))
            elif key == "annotations":
                stream.skip()
                _write_array(out, _coco_annotations(parts, image_offsets))
            else:
                out.write(coco_json(stream.value()[0]))
        out.write(b"}")


def _coco_images(parts: list[Part], offsets: list[int]) -> Iterator[bytes]:
    for part, offset in zip(parts, offsets):
        with _stream(part) as stream:
            members = stream.members()
            _seek_member(stream, members, "images", part)
            count = 0
            for image, _ in stream.items():
                count += 1
                if image.get("id") != count:
                    raise JsonStreamError(f"'{part.path}': image {count} has id {image.get('id')!r}")
                image["id"] = offset + count
                yield coco_json(image)
        if count != part.record.records:
            raise JsonStreamError(f"'{part.path}' holds {count} images, its record says {part.record.records}")


def _coco_annotations(parts: list[Part], offsets: list[int]) -> Iterator[bytes]:
    next_id = 1
    for part, offset in zip(parts, offsets):
        with _stream(part) as stream:
            members = stream.members()
            _seek_member(stream, members, "annotations", part)
            for annotation, _ in stream.items():
                annotation["id"] = next_id
                annotation["image_id"] += offset
                next_id += 1
                yield coco_json(annotation)


def _merge_results(parts: list[Part], out: IO[bytes]) -> None:
    """The bare results list: image ids shifted by the images (with or without detections) before."""
    def items() -> Iterator[bytes]:
        offset = 0
        for part in parts:
            with _stream(part) as stream:
                for result, _ in stream.items():
                    result["image_id"] += offset
                    yield coco_json(result)
                stream.end()
            offset += part.record.records

    _write_array(out, items())


def _merge_lines(parts: list[Part], out: IO[bytes]) -> None:
    """JSON Lines carry no ids: the parts in input order are the file."""
    for part in parts:
        with open(part.path, "rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)


def _merge_geojson(parts: list[Part], out: IO[bytes]) -> None:
    """One FeatureCollection: the first part's header, every part's features unchanged."""
    with _stream(parts[0]) as stream:
        members = stream.members()
        head = {}
        for key in members:
            if key == "features":
                break
            head[key] = stream.value()[0]
        if head.get("type") != "FeatureCollection" or set(head) - {"type", "segcli"}:
            raise JsonStreamError(f"'{parts[0].path}' is not a GeoJSON file segcli wrote")
    writer = GeoJsonWriter(out, head.get("segcli"))
    written = 0
    for part in parts:
        with _stream(part) as stream:
            _seek_member(stream, stream.members(), "features", part)
            for _, raw in stream.items():
                out.write((b"," if written else b"") + raw.encode("utf-8"))
                written += 1
    writer.finish()


def _write_array(out: IO[bytes], items: Iterator[bytes]) -> None:
    out.write(b"[")
    for position, item in enumerate(items):
        out.write((b"," if position else b"") + item)
    out.write(b"]")
