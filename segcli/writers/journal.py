"""Resume support: a manifest, an append-only journal and a lock, kept beside the output.

For `--out preds.json` the state lives in `.preds.json.segcli/` (for an output folder, in
`<folder>/.segcli/`):

- `manifest.json`: the fingerprint of the model and of every setting that changes results,
  written atomically when a run starts over.
- `journal.jsonl`: one JSON object per line, appended with a single `write` per input:
  `{"k": key, "rec": record}` for each image or frame result (formats assembled into one file),
  then `{"k": key, "done": {"size", "mtime_ns", "files"}}` once the input is complete (its
  per-image files and overlays, if any, were written atomically before; `files` names them by
  absolute path, so that they can be removed when their input goes away). A SIGKILL can only leave a torn last
  line or records without their `done`: on resume, the torn tail is cut off and inputs without
  `done` are processed again, so nothing is duplicated or lost.
- `lock`: `flock`ed for the whole run; the kernel releases it when the process dies, however.

An input is done when its key (real path, output name, output stem) has a `done` entry whose
size and mtime still match the file. The final output is assembled from the journal in input
order, so a resumed or grown run writes the same file as one run over everything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from segcli.atomic import atomic_write
from segcli.errors import UsageError

MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
LOCK = "lock"


def state_dir_for(out: Path, out_is_folder: bool) -> Path:
    return out / ".segcli" if out_is_folder else out.parent / f".{out.name}.segcli"


@dataclass
class Signature:
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Signature | None:
        try:
            info = os.stat(path)
        except OSError:
            return None
        return cls(info.st_size, info.st_mtime_ns)


@dataclass
class _Entry:
    signature: Signature
    files: list[str]
    records: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) in the journal


class Journal:
    """The run state of one output; use as a context manager (takes and releases the lock)."""

    def __init__(self, state_dir: Path, fingerprint: dict, resume: bool, output_root: Path | None = None) -> None:
        self.dir = state_dir
        self.fingerprint = fingerprint
        self.resume = resume
        self.output_root = output_root  # where per-image `files` are relative to
        self._lock: IO | None = None
        self._journal: IO[bytes] | None = None
        self._entries: dict[str, _Entry] = {}
        self._reader: IO[bytes] | None = None
        self._orphans = False
        self._pending: dict[str, list[tuple[int, int]]] = {}  # record spans of inputs not done yet

    def __enter__(self) -> Journal:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            if self.resume and (self.dir / MANIFEST).exists():
                self._check_fingerprint()
                self._load()
            else:
                self._start_over()
            self._journal = open(self.dir / JOURNAL, "ab", buffering=0)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()

    # -- the lock ---------------------------------------------------------------------------
    def _take_lock(self) -> None:
        handle = open(self.dir / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip()
            handle.close()
            raise UsageError(f"another segcli run is writing this output{f' (pid {owner})' if owner else ''}; "
                             f"wait for it to finish or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    def _release(self) -> None:
        for handle in (self._journal, self._reader):
            if handle is not None:
                handle.close()
        self._journal = self._reader = None
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.truncate(0)
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    # -- manifest ---------------------------------------------------------------------------
    def _check_fingerprint(self) -> None:
        try:
            stored = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"cannot read the resume manifest in '{self.dir}'; run without --resume to start over") from None
        if stored != self.fingerprint:
            changed = [f"{key} {stored.get(key)!r} -> {self.fingerprint.get(key)!r}"
                       for key in sorted(set(stored) | set(self.fingerprint)) if stored.get(key) != self.fingerprint.get(key)]
            raise UsageError("--resume: the existing output was made with a different model or settings ("
                             + "; ".join(changed) + "); run without --resume to start over")

    def _start_over(self) -> None:
        # Journal first: a crash in between leaves a manifest with no journal, which resumes as empty.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / JOURNAL)
        with atomic_write(self.dir / MANIFEST) as handle:
            json.dump({"fingerprint": self.fingerprint}, handle, indent=1, sort_keys=True)

    # -- reading the journal ----------------------------------------------------------------
    def _load(self) -> None:
        path = self.dir / JOURNAL
        pending: dict[str, list[tuple[int, int]]] = {}
        entries: dict[str, _Entry] = {}
        good_end = 0
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
            offset = 0
            for line in handle:
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("torn last line")
                    entry = json.loads(line)
                    key = entry["k"]
                    if "rec" in entry:
                        pending.setdefault(key, []).append((offset, len(line)))
                    else:
                        done = entry["done"]
                        entries[key] = _Entry(Signature(int(done["size"]), int(done["mtime_ns"])),
                                              list(done.get("files", [])), pending.pop(key, []))
                except (ValueError, KeyError, TypeError):
                    break  # everything from a torn or corrupt line on is dropped
                offset += len(line)
                good_end = offset
            if good_end < os.path.getsize(path):
                with open(path, "r+b") as cut:
                    cut.truncate(good_end)
        self._entries = entries
        self._orphans = bool(pending)  # records of inputs cut short: dropped by keep_only

    def keep_only(self, wanted: dict[str, Path]) -> None:
        """Forget entries that are not wanted (key -> input path) or whose input changed, remove
        the per-image files those entries wrote, and rewrite the journal without them (atomically)."""
        keep: dict[str, _Entry] = {}
        for key, entry in self._entries.items():
            path = wanted.get(key)
            if path is not None and Signature.of(path) == entry.signature:
                keep[key] = entry
            else:
                for name in entry.files:  # absolute paths of the outputs it wrote (or relative to output_root)
                    with contextlib.suppress(OSError):
                        os.unlink(name if os.path.isabs(name) or self.output_root is None else self.output_root / name)
        if len(keep) == len(self._entries) and not self._orphans:
            return
        old = self.dir / JOURNAL
        with open(old, "rb") as source, atomic_write(old, "wb") as out:
            position = 0
            for key, entry in keep.items():
                moved = []
                for offset, length in entry.records:
                    source.seek(offset)
                    out.write(source.read(length))
                    moved.append((position, length))
                    position += length
                line = _line({"k": key, "done": {"size": entry.signature.size, "mtime_ns": entry.signature.mtime_ns,
                                                 "files": entry.files}})
                out.write(line)
                position += len(line)
                entry.records = moved
        self._entries = keep
        self._orphans = False
        # The rename replaced the file: appends must go to the new one.
        if self._journal is not None:
            self._journal.close()
            self._journal = open(old, "ab", buffering=0)
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # -- queries and appends ----------------------------------------------------------------
    def is_done(self, key: str) -> bool:
        return key in self._entries

    def record_count(self, key: str) -> int:
        """How many records a done input has (0 when it is not done)."""
        entry = self._entries.get(key)
        return 0 if entry is None else len(entry.records)

    def records(self, key: str) -> Iterator[dict]:
        """The stored records of a done input, in the order they were added."""
        entry = self._entries.get(key)
        if entry is None:
            return
        if self._reader is None:
            self._reader = open(self.dir / JOURNAL, "rb")
        for offset, length in entry.records:
            self._reader.seek(offset)
            yield json.loads(self._reader.read(length))["rec"]

    def add_records(self, key: str, records: list[dict]) -> None:
        """Append result records of an input (before its `done`)."""
        if records:
            self._append(b"".join(_line({"k": key, "rec": record}) for record in records), key, records=True)

    def done(self, key: str, signature: Signature, files: list[str] | None = None) -> None:
        """Mark an input complete: everything it produced is already written."""
        self._append(_line({"k": key, "done": {"size": signature.size, "mtime_ns": signature.mtime_ns,
                                               "files": files or []}}), key, records=False, signature=signature,
                     files=files or [])

    def _append(self, data: bytes, key: str, records: bool, signature: Signature | None = None,
                files: list[str] | None = None) -> None:
        assert self._journal is not None, "Journal used outside its with-block"
        offset = self._journal.seek(0, os.SEEK_END)
        # One write per call on an O_APPEND unbuffered file: a kill leaves all of it or a torn tail.
        written = self._journal.write(data)
        if written != len(data):
            raise OSError(f"short write to {self.dir / JOURNAL}")
        if records:
            spans, position = [], offset
            for line in data.splitlines(keepends=True):
                spans.append((position, len(line)))
                position += len(line)
            self._pending.setdefault(key, []).extend(spans)
        else:
            self._entries[key] = _Entry(signature, files, self._pending.pop(key, []))

    def forget_pending(self, key: str) -> None:
        """Drop records appended for an input that will not be marked done (it failed)."""
        self._pending.pop(key, None)


def _line(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"
