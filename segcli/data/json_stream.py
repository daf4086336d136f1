"""Read one large JSON document piece by piece: the members of its top-level object, the items of
an array, each decoded alone. Memory holds one item (an image, an annotation, a feature) at a
time, so a COCO file of millions of images is read in a few megabytes.

Built on `json.JSONDecoder.raw_decode` over a sliding text buffer; each item comes with its raw
text too, for callers that copy items unchanged.
"""

from __future__ import annotations

import json
from typing import IO, Any, Iterator

_CHUNK = 1 << 20
_WHITESPACE = " \t\n\r"
_decoder = json.JSONDecoder()


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
        self.peek()
        while True:
            try:
                value, end = _decoder.raw_decode(self._buffer, self._pos)
            except json.JSONDecodeError as exc:
                if self._more():  # the value runs past the buffer: read on and try again
                    continue
                raise JsonStreamError(str(exc)) from None
            # A number at the very end of the buffer may go on in the next chunk.
            if end == len(self._buffer) and self._more():
                continue
            raw = self._buffer[self._pos:end]
            self._pos = end
            return value, raw

    def members(self) -> Iterator[str]:
        """The keys of the object that starts here; after each key, the caller reads its value
        (`value()` or `items()`) before asking for the next."""
        self.expect("{")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            key, _ = self.value()
            if not isinstance(key, str):
                raise JsonStreamError("an object key is not a string")
            self.expect(":")
            yield key
            following = self.peek()
            self._pos += 1
            if following == "}":
                return
            if following != ",":
                raise JsonStreamError(f"expected ',' or '}}', found {following or 'the end of the file'!r}")

    def items(self) -> Iterator[tuple[Any, str]]:
        """The items of the array that starts here, each with its raw text."""
        self.expect("[")
        if self.peek() == "]":
            self._pos += 1
            return
        while True:
            yield self.value()
            following = self.peek()
            self._pos += 1
            if following == "]":
                return
            if following != ",":
                raise JsonStreamError(f"expected ',' or ']', found {following or 'the end of the file'!r}")

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
