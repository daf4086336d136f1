"""Small checks and helpers the `segcli eval` readers share: JSON values as COCO files hold them
(numpy scalars count, for in-memory results), file names compared as paths, and warnings that
name a few examples rather than thousands."""

from __future__ import annotations

import math
import posixpath
from collections import Counter
from typing import Any

import numpy as np

from segcli.errors import UsageError

MAX_NAMED = 5  # how many examples a warning names before it says "..."


def unique_index(pairs) -> dict:
    index: dict = {}
    seen: Counter = Counter()
    for key, value in pairs:
        if key is None:
            continue
        seen[key] += 1
        index[key] = value
    return {key: value for key, value in index.items() if seen[key] == 1}


def normal_name(name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return None
    name = posixpath.normpath(name.replace("\\", "/"))
    return name[2:] if name.startswith("./") else name


def base_name(name: Any) -> str | None:
    name = normal_name(name)
    return posixpath.basename(name) if name else None


def no_duplicates(values: list, what: str) -> None:
    repeated = [value for value, count in Counter(values).items() if count > 1]
    if repeated:
        raise UsageError(f"{what}s repeat: {some(sorted(repeated))}")


def some(values: list) -> str:
    shown = ", ".join(str(v) for v in values[:MAX_NAMED])
    return shown + (", ..." if len(values) > MAX_NAMED else "")


# numpy scalars count: a trainer's in-memory results are often built from arrays.
def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def plain_number(value: Any) -> int | float:
    return value.item() if isinstance(value, np.generic) else value


def is_box(value: Any) -> bool:
    return (isinstance(value, (list, tuple, np.ndarray)) and len(value) == 4
            and all(is_number(v) and math.isfinite(v) for v in value))
