"""Wording of the lines segcli prints: counts with the right plural, and file names that cannot
break a one-line message."""

from __future__ import annotations

_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
              "\\": "\\\\"}


def escaped(text: object, backslashes: bool = True) -> str:
    """`text` with what cannot be shown on one line written as C escapes, as `ls -b` writes file
    names: a newline becomes `\\n`, a tab `\\t`, a backslash `\\\\`, other control or invisible
    characters and bytes that are not UTF-8 (kept by Python as surrogates) `\\ooo` octal bytes.
    Spaces and printable Unicode stay as they are, so `ñandú 写真.jpg` reads as itself.
    `backslashes=False` leaves backslashes alone (for text that holds escapes already)."""
    text = str(text)
    if text.isprintable() and (not backslashes or "\\" not in text):  # the common case: nothing to do
        return text
    out = []
    for char in text:
        if char == "\\" and not backslashes:
            out.append(char)
        elif char in _C_ESCAPES:
            out.append(_C_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            # os.fsdecode keeps an undecodable byte b as the lone surrogate U+DC00 + b.
            data = bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else char.encode("utf-8", "surrogatepass")
            out.append("".join(f"\\{byte:03o}" for byte in data))
    return "".join(out)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 image`, `2 images`, `0 images`; `nouns` for plurals that are not noun + s."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"
