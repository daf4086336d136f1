"""Read one large JSON document piece by piece: the members of its top-level object, the items of
an array, each decoded alone. Memory holds one item (an image, an annotation, a feature) at a
time, so a COCO file of millions of images is read in a few megabytes.

Built on `json.JSONDecoder.raw_decode` over a sliding text buffer; each item comes with its raw
text too, for callers that copy items unchanged.
"""

from __future__ import annotations

import json
import re
from typing import IO, Any, Iterator

_CHUNK = 1 << 20
_WHITESPACE = " \t\n\r"
_decoder = json.JSONDecoder()
_DELIMITER = re.compile(r"[,:\]}\s]")


class JsonStreamError(ValueError):
    pass


class JsonStream:
    """A cursor over the JSON text of `handle` (opened in text mode)."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle
        self._buffer = ""
        self._pos = 0
        self._eof = False

    def _more(self) -> bool:
        if self._eof:
            return False
        chunk = self._handle.read(_CHUNK)
        if not chunk:
            self._eof = True
            return False
        self._buffer = self._buffer[self._pos:] + chunk
        self._pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end), without consuming it."""
        while True:
            while self._pos < len(self._buffer) and self._buffer[self._pos] in _WHITESPACE:
                self._pos += 1
            if self._pos < len(self._buffer) or not self._more():
                return self._buffer[self._pos:self._pos + 1]

    def expect(self, char: str) -> None:
        found = self.peek()
        if found != char:
            raise JsonStreamError(f"expected {char!r}, found {found or 'the end of the file'!r}")
        self._pos += 1

    def value(self) -> tuple[Any, str]:
        """Decode the next value; returns it with its raw text."""
        if self.peek() not in ("{", "[", '"'):
            # A bare number cut by the buffer's end decodes as a shorter one ("2." as 2):
            # read on until a delimiter follows it.
            while not _DELIMITER.search(self._buffer, self._pos) and self._more():
                pass
        while True:
            try:
                value, end = _decoder.raw_decode(self._buffer, self._pos)
            except json.JSONDecodeError as exc:
                if self._more():  # the value runs past the buffer: read on and try again
                    continue
                raise JsonStreamError(str(exc)) from None
            raw = self._buffer[self._pos:end]
            self._pos = end
            return value, raw

    def members(self) -> Iterator[str]:
        """The keys of the object that starts here; after each key, the caller reads its value
        (`value()` or `items()`) before asking for the next."""
        if self._opens("{", "}"):
            while True:
                key, _ = self.value()
                if not isinstance(key, str):
                    raise JsonStreamError("an object key is not a string")
                self.expect(":")
                yield key
                if self._closes("}"):
                    return

    def items(self) -> Iterator[tuple[Any, str]]:
        """The items of the array that starts here, each with its raw text."""
        if self._opens("[", "]"):
            while True:
                yield self.value()
                if self._closes("]"):
                    return

    def _opens(self, opening: str, closing: str) -> bool:
        """Consume `opening`; False (and the `closing` too) when the container is empty."""
        self.expect(opening)
        if self.peek() == closing:
            self._pos += 1
            return False
        return True

    def _closes(self, closing: str) -> bool:
        """After an entry: True at `closing`, False at a comma (both consumed)."""
        following = self.peek()
        self._pos += 1
        if following == closing:
            return True
        if following != ",":
            raise JsonStreamError(f"expected ',' or {closing!r}, found {following or 'the end of the file'!r}")
        return False

    def skip(self) -> None:
        """Pass over the next value, array items one at a time (a skipped `images` list stays small)."""
        if self.peek() == "[":
            for _ in self.items():
                pass
        else:
            self.value()

    def end(self) -> None:
        if self.peek() != "":
            raise JsonStreamError("text after the end of the document")
