"""`segcli predict --shard K/N`: the K-th of N deterministic slices of the input list, and the
part record that lets `segcli merge` rebuild the file one process would have written.

A shard is a contiguous run of the expanded input list (the order every run sees: SOURCEs in
the order given, folders and globs sorted), cut into N runs whose lengths differ by at most one.
An input is never split: a video belongs whole to one shard. Contiguous runs (rather than every
N-th input) keep the merge a concatenation in shard order, and when a folder grows, only inputs
near the cut points change shard, so `--resume` per shard redoes little.

Output names are decided over the whole list before it is cut (two `img.jpg` from different
folders get the same prefixed name in every shard as in one run), and the part record carries a
digest of those names: parts made over different input lists are refused by merge.

The part record is a small JSON file beside the part, `part-1.json` -> `part-1.json.shard`,
written after the part itself, atomically, only when the run finished (an interrupted shard has
none, so merge refuses it). It keeps the merge's bookkeeping out of the part, which stays a plain
COCO / JSON Lines / GeoJSON file, and out of the merged file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence, TypeVar

from segcli.atomic import atomic_write
from segcli.errors import UsageError

PART_SUFFIX = ".shard"
PART_VERSION = 1
_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")

T = TypeVar("T")


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` (1-based) of `count`."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> ShardSpec:
    """`--shard K/N` with 1 <= K <= N; anything else is a usage error naming the value."""
    match = _SHARD.fullmatch(str(text))
    if match is None:
        raise UsageError(f"--shard {text!r}: expected K/N, the K-th of N shards (1/4, 2/4, 3/4, 4/4)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise UsageError(f"--shard {text!r}: K must be between 1 and N (shards are numbered 1/{max(count, 1)} "
                         f"to {max(count, 1)}/{max(count, 1)})")
    return ShardSpec(index, count)


def shard_range(spec: ShardSpec, total: int) -> range:
    """The positions of shard `spec` among `total` inputs: contiguous, sizes differ by at most one."""
    return range((spec.index - 1) * total // spec.count, spec.index * total // spec.count)


def inputs_digest(file_names: Sequence[str], stems: Sequence[str]) -> str:
    """What names every output of a run: the inputs' output names and stems, in order."""
    payload = json.dumps([list(pair) for pair in zip(file_names, stems)], ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Span:
    """Inputs `[start, stop)` of a run over `total` inputs whose names have digest `digest`."""

    start: int
    stop: int
    total: int
    digest: str

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.total

    def take(self, values: Sequence[T]) -> list[T]:
        return list(values[self.start:self.stop])

    def within(self, spec: ShardSpec) -> Span:
        """Shard `spec` of this span (torchrun inside a `--shard` job splits the shard again)."""
        inner = shard_range(spec, self.stop - self.start)
        return replace(self, start=self.start + inner.start, stop=self.start + inner.stop)

    def describe(self) -> str:
        return f"inputs {self.start + 1}-{self.stop} of {self.total}" if self.stop > self.start else \
            f"no inputs (of {self.total})"


@dataclass
class PartRecord:
    """The `.shard` file beside a part: which inputs the part holds, what made it, and what it is."""

    span: Span
    shard: str  # "K/N" as asked for (messages only; the span is what merge relies on)
    format: str
    fingerprint: dict  # segcli.predict.fingerprint: model and every setting that changes results
    records: int  # images and video frames in the part (coco-results lists only those with detections)
    part_bytes: int
    part_sha256: str
    version: int = PART_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PartRecord:
        """The record a `.shard` file holds; ValueError for anything else. Records are small files
        people copy, and may edit: every field is checked for its type and range here, or a
        string where a number belongs would be a TypeError deep inside merge (a traceback), and
        a span outside its inputs a wrong merge."""
        fields = {"span": dict, "shard": str, "format": str, "fingerprint": dict, "records": int, "part_bytes": int,
                  "part_sha256": str, "version": int}
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        unknown, missing = set(data) - set(fields), set(fields) - set(data) - {"version"}
        if unknown or missing:
            raise ValueError(f"fields {sorted(missing)} missing, {sorted(unknown)} unknown")
        for key, kind in fields.items():
            if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
                raise ValueError(f"{key!r} is not a {kind.__name__}")
        if data["records"] < 0 or data["part_bytes"] < 0:
            raise ValueError("negative counts")
        span = data["span"]
        if (set(span) != {"start", "stop", "total", "digest"} or not isinstance(span["digest"], str)
                or not all(isinstance(span[k], int) and not isinstance(span[k], bool) for k in ("start", "stop", "total"))
                or not 0 <= span["start"] <= span["stop"] <= span["total"]):
            raise ValueError(f"'span' is not inputs [start, stop) of total: {span!r}")
        return cls(**{**data, "span": Span(**span)})


def record_path(part: Path) -> Path:
    return part.with_name(part.name + PART_SUFFIX)


def file_sha256(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def write_record(part: Path, span: Span, shard: str, fmt: str, fingerprint: dict, records: int) -> PartRecord:
    """Describe the finished `part` in its `.shard` file (atomically, after the part is complete)."""
    size, digest = file_sha256(part)
    record = PartRecord(span, shard, fmt, fingerprint, records, size, digest)
    with atomic_write(record_path(part)) as handle:
        json.dump(record.to_json(), handle, indent=1, sort_keys=True, ensure_ascii=False)
        handle.write("\n")
    return record


def read_record(part: Path) -> PartRecord:
    """The part record of `part`; a missing, unreadable or stale one is a usage error."""
    path = record_path(part)
    if not path.is_file():
        raise UsageError(f"'{part}' has no part record ('{path.name}' beside it): parts are made by "
                         f"`segcli predict --shard K/N --out FILE` and get it when the run finishes "
                         f"(an interrupted shard has none: rerun it with --resume)")
    try:
        record = PartRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read the part record '{path}': {exc}") from None
    if record.version != PART_VERSION:
        raise UsageError(f"'{path}' is a part record of another segcli version ({record.version}); "
                         f"redo the shard with this one")
    try:
        size, digest = file_sha256(part)
    except OSError as exc:
        raise UsageError(f"cannot read part '{part}': {exc.strerror}") from None
    if (size, digest) != (record.part_bytes, record.part_sha256):
        raise UsageError(f"'{part}' changed after its shard run wrote it (its size or checksum differs from "
                         f"'{path.name}'); rerun that shard")
    return record


def forget_record(part: Path) -> None:
    """Remove a part record before its part is rewritten: an unfinished run must leave none."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(part))


@dataclass
class ShardRun:
    """What `run_predict` does differently for a shard: which inputs, where its state lives, and
    the part record at the end. `options` is a PredictOptions; `plan` its OutputPlan."""

    span: Span
    label: str  # "2/8", "1/2 (rank)", "2/8, rank 1/2"
    plan: object

    @classmethod
    def of(cls, options, plan, file_names: Sequence[str], stems: Sequence[str]) -> ShardRun | None:
        """None for a run over everything; else this process's share (`--shard`, then its rank under torchrun)."""
        if options.shard is None and options.rank is None:
            return None
        span = Span(0, len(stems), len(stems), inputs_digest(file_names, stems))
        labels, folder = [], ".segcli"
        if options.shard is not None:
            spec = parse_shard(options.shard)
            span, folder = span.within(spec), f"{folder}-shard-{spec.index}-of-{spec.count}"
            labels.append(str(spec))
        if options.rank is not None:
            span, folder = span.within(options.rank), f"{folder}-rank-{options.rank.index}-of-{options.rank.count}"
            labels.append(f"rank {options.rank}")
        if plan.per_image:
            # Shards write into one output folder side by side: each keeps its own journal and lock.
            plan = replace(plan, state_dir=plan.out / folder)
        return cls(span, ", ".join(labels), plan)

    @property
    def writes_part(self) -> bool:
        """One-file outputs become parts with a record; per-image files and stdout need no merge."""
        return self.plan.out is not None and not self.plan.per_image

    def begin(self) -> None:
        if self.writes_part:
            forget_record(self.plan.out)

    def finish(self, journal, keys: Sequence[str], fingerprint: dict) -> PartRecord | None:
        """Write the part record once the part is complete (`journal` holds what it was made from)."""
        if not self.writes_part:
            return None
        records = sum(journal.record_count(key) for key in keys)
        return write_record(self.plan.out, self.span, self.label, self.plan.format, fingerprint, records)
