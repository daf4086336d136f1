"""Refuse, before any work, an output path that would destroy a file the user cares about.

Every subcommand names its inputs and the outputs it is about to write; `refuse_overwrites`
stops the run with one line naming both paths when an output

- is an input (the same file: by path after symlinks, or by device and inode, which also
  catches hard links): `segcli predict a.jpg --out a.jpg` would replace the photo;
- is another output of the same run: `--report x.json --save-pred x.json`;
- lies under a path that is a file (`--out a.jpg/x.json`), or cannot be created there.

Outputs written atomically replace a symlink or hard link rather than writing through it, so the
input's bytes would survive in some cases; they are refused all the same, since the run would
still leave one name pointing at something else than the user expects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from segcli.errors import UsageError


@dataclass(frozen=True)
class Output:
    """A path a run is about to write."""

    option: str  # how the message names it: "--out", "--report"
    path: Path  # the file (or folder) itself
    given: str | None = None  # what the user typed, when `path` is a file inside it ("--out labels/")
    folder: bool = False  # a folder the run writes into; several outputs may share one

    @property
    def named(self) -> str:
        return f"{self.option} '{self.given if self.given is not None else self.path}'"


def refuse_overwrites(inputs: Iterable[tuple[str, Path]], outputs: Sequence[Output],
                      files: Iterable[Output] = ()) -> None:
    """Raise UsageError if an output is an input file or another output, or cannot be created.

    `inputs` are (name for the message, path) of the files the run reads: "the input" for
    images, "--gt" for a flag's file. Paths that do not exist (a missing file named in a list)
    cannot be overwritten and are ignored. `outputs` are the paths the options name; `files`
    the many files a run writes inside its output folders (one per image), unique by
    construction, so they are checked against the inputs only (a `stat` each, no path resolving).
    """
    by_inode: dict[tuple[int, int], tuple[str, Path]] = {}
    for name, path in inputs:
        inode = _inode(path)
        if inode is not None:
            by_inode.setdefault(inode, (name, Path(path)))
    claimed: dict[str, Output] = {}
    for output in outputs:
        if output.folder:  # a folder cannot replace a file: say that the path names one, and which
            known = by_inode.get(_inode(output.path))
            if known is not None:
                raise UsageError(f"{output.named} is {known[0]} '{known[1]}', a file; give a folder")
            check_location(output)
        else:  # resolved first: `new/../a.jpg` is a.jpg once `new/` is created
            _refuse_input(output, by_inode, os.path.realpath(output.path))
        key = os.path.normcase(os.path.realpath(output.path))
        other = claimed.get(key)
        if other is not None and not (other.folder and output.folder):
            raise UsageError(f"{output.named} and {other.named} would be the same "
                             f"{'path' if other.folder or output.folder else 'file'}; give each its own")
        claimed.setdefault(key, output)
    for output in files:
        _refuse_input(output, by_inode, output.path)
    for output in outputs:
        if not output.folder:
            check_location(output)


def _refuse_input(output: Output, by_inode: dict[tuple[int, int], tuple[str, Path]], path_to_check: str | Path) -> None:
    inode = _inode(path_to_check)
    if inode is not None and inode in by_inode:
        name, path = by_inode[inode]
        where = f" (its file '{output.path}')" if output.given is not None and output.path != path else ""
        raise UsageError(f"{output.named}{where} would overwrite {name} '{path}'; choose another path")


def check_location(output: Output) -> None:
    """An output must be creatable: every existing parent a folder (`--out a.jpg/x.json` is not),
    the output itself a folder or a file as the run needs, and the nearest existing parent writable."""
    path = output.path
    if path.exists() and path.is_dir() != output.folder:
        what = "a folder; give a file name" if path.is_dir() else "a file; give a folder"
        raise UsageError(f"{output.named} is {what}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{output.named}: '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{output.named}: cannot write into '{parent}' (permission denied)")


def file_inputs(named: str, paths: Iterable[str | Path | None]) -> list[tuple[str, Path]]:
    """(named, path) for each of `paths` that is a file: a flag's value may also be a registry
    name (`--weights coco`), a folder, `-` or nothing."""
    return [(named, Path(path)) for path in paths if path not in (None, "", "-") and os.path.isfile(path)]


def first_missing(path: Path) -> Path | None:
    """The outermost of `path` and its parents that does not exist yet: what writing `path` creates,
    and what to remove when a run fails before it wrote anything there."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino
