"""Turn the SOURCE arguments of the command line into one ordered, duplicate-free list of inputs.

A SOURCE is a folder, a quoted glob, a `.txt` list of paths, `-` (paths on stdin), or an image or
video file. Folders yield images and videos, told apart by extension (`InputItem.is_video`).
Mistakes in the arguments themselves are `UsageError`s; files that a list names but that do not
exist are kept, so the decoder reports them per input ("no such file") and the run goes on.
"""

from __future__ import annotations

import glob
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterable, Sequence, TextIO

from segcli.errors import UsageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
"""Image extensions (compared case-insensitively) picked up when a folder is searched."""

# .mts/.m2ts: MPEG transport streams as camcorders (AVCHD) and broadcast recorders write them.
# Not .ts: in a folder that is as often TypeScript as a stream.
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".mts", ".m2ts", ".wmv", ".flv"}
"""Video extensions picked up in folders; files given by name with these are read as videos too."""


_FOLDER_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


@dataclass(frozen=True)
class InputItem:
    """One image to process.

    `file_name` is what the outputs call it (COCO `file_name`): the posix path relative to the
    SOURCE folder for folder and glob sources, or the path exactly as given for files, list entries
    and stdin lines; see `expand_sources` for how clashes are renamed.
    """

    path: Path
    file_name: str

    @property
    def is_video(self) -> bool:
        """Read frame by frame (segcli.data.video) rather than as one image."""
        return self.path.suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class _Found:
    item: InputItem
    label: str  # folder name used to disambiguate a clashing file_name


def expand_sources(specs: Sequence[str], stdin: TextIO | None = None,
                   ignored: Counter[str] | None = None) -> list[InputItem]:
    """Expand SOURCE arguments, in order, into input items.

    - folder: searched recursively (following symlinked folders, each real folder once, so symlink
      loops end), hidden files and folders skipped, only `IMAGE_EXTENSIONS`, sorted by relative path;
    - glob (contains `*`, `?` or `[` and is not an existing path): `glob.glob(recursive=True)`, so
      `**` works; matching files sorted; file_name relative to the pattern's leading literal folder;
    - `.txt` file: one path per line, blank lines and `#` comments skipped, relative paths relative
      to the list's folder;
    - `-`: one path per line from `stdin` (default `sys.stdin`), relative to the current folder;
    - any other existing file: taken as an image as given.

    The same file (same resolved path) named twice is kept once, first occurrence wins. A later
    file whose `file_name` is already taken by a different file is renamed `<label>/<file_name>`,
    where label is the name of the folder it was found under (the SOURCE folder, the glob's leading
    folder, or for single files and list entries the file's own folder); if that is taken too,
    `<label>-2/<file_name>`, `<label>-3/...`. So output file_names are always unique.

    Files in folders whose extension is neither an image's nor a video's (`.gif`, `.heic`,
    `notes.txt`) are left out; `ignored`, if given, counts them by lower-case extension, so the
    run can say how many it did not look at.

    Raises `UsageError` for a SOURCE that does not exist, a glob matching no files, a folder with no
    images, or a list / stdin naming no paths.
    """
    found: list[_Found] = []
    ignored = Counter() if ignored is None else ignored
    for spec in specs:
        found.extend(_expand_one(spec, stdin, ignored))
    return _unique(found)


def _expand_one(spec: str, stdin: TextIO | None, ignored: Counter[str]) -> list[_Found]:
    if spec == "-":
        return _from_lines(stdin if stdin is not None else sys.stdin, Path(), "no paths read from stdin")
    if not spec:  # Path("") would silently mean the current folder
        raise UsageError("SOURCE '' does not exist")
    path = Path(spec)
    # An existing path wins over glob syntax: a file may really be called "scan[1].png".
    if path.is_dir():
        return _from_folder(spec, ignored)
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return _from_list(path)
        return [_Found(InputItem(path, spec), _folder_label(path.parent))]
    if glob.has_magic(spec):
        return _from_glob(spec)
    raise UsageError(f"SOURCE '{spec}' does not exist")


def _from_folder(spec: str, ignored: Counter[str]) -> list[_Found]:
    root = Path(spec)
    others: Counter[str] = Counter()
    found = [(relative, root / relative) for relative in _walk_images(root, others)]
    if not found:
        raise UsageError(f"no images or videos found in '{spec}'"
                         + (f" (other files: {describe_ignored(others)})" if others else ""))
    ignored.update(others)
    label = _folder_label(root)
    return [_Found(InputItem(path, relative), label) for relative, path in sorted(found)]


def _walk_images(root: Path, ignored: Counter[str]) -> Iterable[str]:
    """Posix paths, relative to `root`, of the non-hidden image and video files below it; other
    non-hidden files are counted in `ignored` by extension."""
    visited: set[str] = set()

    def on_error(error: OSError) -> None:
        # An unreadable SOURCE folder is the user's mistake; an unreadable subfolder is skipped.
        if os.path.realpath(error.filename) == os.path.realpath(root):
            raise UsageError(f"cannot read folder '{root}': {error.strerror}")

    for folder, subfolders, files in os.walk(root, onerror=on_error, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # reached again through a symlink (or a loop): already listed
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative_folder = PurePath(os.path.relpath(folder, root))
        for name in files:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() not in _FOLDER_EXTENSIONS:
                ignored[Path(name).suffix.lower()] += 1
                continue
            if os.path.isfile(os.path.join(folder, name)):  # skips broken symlinks
                yield (relative_folder / name).as_posix()


def describe_ignored(ignored: Counter[str], shown: int = 5) -> str:
    """`.gif 3, .heic 1` (the most common extensions first; a file without one is `no extension`)."""
    common = sorted(ignored.items(), key=lambda entry: (-entry[1], entry[0] == "", entry[0]))[:shown]
    parts = [f"{extension or 'no extension'} {count}" for extension, count in common]
    if len(ignored) > shown:
        parts.append("...")
    return ", ".join(parts)


def _from_glob(spec: str) -> list[_Found]:
    base = _literal_prefix(spec)
    matches = [match for match in glob.glob(spec, recursive=True) if os.path.isfile(match)]
    if not matches:
        raise UsageError(f"glob '{spec}' matched no files")
    label = _folder_label(Path(base))
    relative = sorted((PurePath(os.path.relpath(match, base)).as_posix(), match) for match in matches)
    return [_Found(InputItem(Path(match), name), label) for name, match in relative]


def _literal_prefix(pattern: str) -> str:
    """The leading folders of a glob pattern that contain no wildcard ('.' if none)."""
    parts = PurePath(pattern).parts
    literal: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        literal.append(part)
    return str(PurePath(*literal)) if literal else os.curdir


def _from_list(list_path: Path) -> list[_Found]:
    try:
        with open(list_path, encoding="utf-8") as handle:
            return _from_lines(handle, list_path.parent, f"no paths listed in '{list_path}'")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot read list '{list_path}': {reason}") from None


def _from_lines(lines: Iterable[str], folder: Path, if_empty: str) -> list[_Found]:
    """One item per listed path; leading/trailing whitespace is stripped (CRLF lists work)."""
    found = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = folder / entry  # an absolute entry replaces `folder`
        # Missing files are kept on purpose: the decoder reports them as failed inputs.
        found.append(_Found(InputItem(path, entry), _folder_label(path.parent)))
    if not found:
        raise UsageError(if_empty)
    return found


def _folder_label(folder: Path) -> str:
    return Path(os.path.realpath(folder)).name or "root"


def _unique(found: list[_Found]) -> list[InputItem]:
    seen_paths: set[str] = set()
    taken_names: set[str] = set()
    items = []
    for entry in found:
        real = os.path.realpath(entry.item.path)
        if real in seen_paths:
            continue
        seen_paths.add(real)
        name = _free_name(entry.item.file_name, entry.label, taken_names)
        taken_names.add(name)
        items.append(InputItem(entry.item.path, name))
    return items


def _free_name(name: str, label: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    candidate = f"{label}/{name}"
    suffix = 2
    while candidate in taken:
        candidate = f"{label}-{suffix}/{name}"
        suffix += 1
    return candidate
