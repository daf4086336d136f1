"""Atomic file output: readers see the old file or the complete new one, never a partial write."""

from __future__ import annotations

import contextlib
import os
import socket
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
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
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


def temporary_prefix(path: Path) -> str:
    """The name a temporary file beside `path` starts with: `.NAME.HOST-PID.`; atomic_write
    removes such files of dead writers (see remove_stale_temporaries). End the name with `.tmp`,
    or `.tmp.EXT` where a library picks the format from the extension (overlay videos)."""
    return f".{path.name}.{_owner()}."


def _owner() -> str:
    """Who writes a temporary file: `host-pid`, so that a later writer can tell a dead one's."""
    return f"{socket.gethostname().replace('.', '-')}-{os.getpid()}"


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporary files of `path` whose writer, on this host, is no longer running.

    A writer killed by SIGKILL (a cron job's timeout, the OOM killer) cannot remove its temporary
    file, and each retry would leave another: as large as the output itself. Only files named by
    this host (another machine on a shared filesystem may be writing its own) and whose process
    is gone are removed; a live process's file, or a name not ours, is never touched."""
    host = socket.gethostname().replace(".", "-")
    prefix = f".{path.name}.{host}-"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and (name.endswith(".tmp") or name.rpartition(".")[0].endswith(".tmp"))):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(path.parent / name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, run by someone else
        return True
    return True


def new_file_mode() -> int:
    """The permissions a file created by `open()` gets here (0o644 under the usual umask 022)."""
    return 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set it straight back
    os.umask(mask)
    return mask
