"""Where per-image outputs go: the input's path relative to its SOURCE, mirrored under the output
folder, so two `img.jpg` in different subfolders never overwrite each other.

Names are decided over the whole (deterministically ordered) input list at once, so a rerun over
the same inputs, or a resumed run, gives every input the same output name.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Sequence

from segcli.data.sources import InputItem


def output_stems(items: Sequence[InputItem]) -> list[str]:
    """A relative posix path without extension per item (`sub/img` for `sub/img.jpg`).

    The file name is used without `..`, `.` or a leading `/` (an absolute path from a list is
    mirrored below the output folder). Two inputs that would share a stem (`img.jpg` and
    `img.png` in one folder) keep it for the first and use the full name (`img.png`) for the
    rest; any remaining clash gets `~2`, `~3`.
    """
    stems: list[str] = []
    taken: set[str] = set()
    for item in items:
        parts = [p for p in PurePosixPath(item.file_name.replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
        relative = PurePosixPath(*parts) if parts else PurePosixPath("input")
        candidates = [relative.with_suffix("").as_posix() if relative.suffix else relative.as_posix(), relative.as_posix()]
        stem = next((c for c in candidates if c.casefold() not in taken), None)
        counter = 2
        while stem is None:
            if f"{candidates[1]}~{counter}".casefold() not in taken:
                stem = f"{candidates[1]}~{counter}"
            counter += 1
        taken.add(stem.casefold())  # case-insensitive: the output may be on a case-insensitive disk
        stems.append(stem)
    return stems


def frame_stem(stem: str, frame: int | None) -> str:
    """A video's frames go into a folder named after the video: `clip/000042`."""
    return stem if frame is None else f"{stem}/{frame:06d}"
