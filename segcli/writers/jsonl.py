"""JSON Lines: one record (segcli.writers.records) per image or video frame, one per line."""

from __future__ import annotations

import json
from typing import IO


def record_line(record: dict) -> bytes:
    # json escapes newlines inside strings, so a record is always exactly one line.
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"


class JsonlWriter:
    """Writes each record as it comes and flushes, so a reader downstream (`| jq`) sees it at once."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def add_record(self, record: dict) -> None:
        self._stream.write(record_line(record))
        self._stream.flush()
