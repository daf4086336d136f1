"""Atomic file output: readers see the old file or the complete new one, never a partial write."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was. The temporary
    file lives in the same folder so that the final `os.replace` is a same-filesystem rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            # mkstemp creates 0600 files; outputs get the permissions any new file would (umask).
            os.fchmod(handle.fileno(), new_file_mode())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def new_file_mode() -> int:
    """The permissions a file created by `open()` gets here (0o644 under the usual umask 022)."""
    return 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set it straight back
    os.umask(mask)
    return mask
