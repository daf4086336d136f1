"""Decode images in background threads so the model never waits for JPEG decoding.

Pillow and OpenCV release the GIL while decoding, so threads give real parallelism here without
the start-up and pickling cost of processes.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Sequence

import numpy as np

from segcli.data.images import ImageReadError, read_image
from segcli.data.sources import InputItem


@dataclass
class Decoded:
    """One input after decoding: exactly one of `image` (HxWx3 uint8 RGB) and `error` is set."""

    item: InputItem
    index: int  # position in the input sequence
    image: np.ndarray | None
    error: str | None  # short human reason, e.g. "no such file"


def decode_item(item: InputItem, index: int) -> Decoded:
    """Decode one input; a bad file becomes `Decoded(error=reason)`, never an exception."""
    try:
        return Decoded(item, index, read_image(item.path), None)
    except ImageReadError as exc:
        return Decoded(item, index, None, exc.reason)


def iter_decoded(items: Sequence[InputItem], workers: int = 2, prefetch: int = 8) -> Iterator[Decoded]:
    """Yield every item decoded, in input order.

    With `workers` > 0 a thread pool decodes ahead of the consumer, but never more than `prefetch`
    images at a time (finished or in progress), so memory stays bounded on huge folders. With
    `workers` == 0 each image is decoded inline when asked for. Closing the generator early
    (`close()`, `break`, an exception or KeyboardInterrupt in the consumer) cancels the queued
    decodes and waits only for the at most `workers` already running.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    if workers == 0:
        for index, item in enumerate(items):
            yield decode_item(item, index)
        return
    yield from _decode_in_pool(items, workers, prefetch)


def _decode_in_pool(items: Sequence[InputItem], workers: int, prefetch: int) -> Iterator[Decoded]:
    todo = enumerate(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segcli-decode")
    pending: deque[Future[Decoded]] = deque()
    try:
        for index, item in islice(todo, prefetch):
            pending.append(pool.submit(decode_item, item, index))
        while pending:
            result = pending.popleft().result()
            # Refill before yielding, so decoding goes on while the consumer runs the model.
            for index, item in islice(todo, 1):
                pending.append(pool.submit(decode_item, item, index))
            yield result
    finally:
        # Queued work is dropped; running decodes are short and finite, so waiting cannot hang.
        pool.shutdown(wait=True, cancel_futures=True)
