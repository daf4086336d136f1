"""Decode images and video frames in background threads so the model never waits for decoding.

Pillow and OpenCV release the GIL while decoding, so threads give real parallelism here without
the start-up and pickling cost of processes. A video becomes a stream of frames, read by one
thread into a small bounded queue: however long the video, only a few frames exist at a time.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Sequence, Union

import numpy as np

from segcli.data.images import ImageReadError, read_image
from segcli.data.sources import InputItem
from segcli.data.video import VideoReader


@dataclass
class Decoded:
    """One image or video frame after decoding: exactly one of `image` (HxWx3 uint8 RGB) and `error`
    is set, except for an `InputDone` marker."""

    item: InputItem
    index: int  # position in the input sequence
    image: np.ndarray | None
    error: str | None  # short human reason, e.g. "no such file"
    frame: int | None = None  # video frames: index in the video (0-based, stride-skipped frames counted)
    timestamp: float | None = None  # video frames: seconds from the start
    fps: float | None = None  # video frames: frames per second after the stride (0.0: unknown)


@dataclass
class InputDone:
    """Sent after the last frame of a video that was read (possibly ending early, see `note`)."""

    item: InputItem
    index: int
    frames: int  # frames delivered (after the stride)
    note: str | None = None  # e.g. the decoder stopped long before the header's frame count
    fps: float = 0.0


Decodable = Union[Decoded, InputDone]


def decode_item(item: InputItem, index: int) -> Decoded:
    """Decode one input; a bad file becomes `Decoded(error=reason)`, never an exception."""
    try:
        return Decoded(item, index, read_image(item.path), None)
    except ImageReadError as exc:
        return Decoded(item, index, None, exc.reason)


def iter_decoded(items: Sequence[InputItem], workers: int = 2, prefetch: int = 8,
                 vid_stride: int = 1) -> Iterator[Decodable]:
    """Yield every item decoded, in input order; a video yields its frames (every `vid_stride`-th)
    in order followed by an `InputDone`, or one `Decoded` with the error if it cannot be read.

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
    if vid_stride < 1:
        raise ValueError(f"vid_stride must be >= 1, got {vid_stride}")
    if workers == 0:
        for index, item in enumerate(items):
            if item.is_video:
                yield from iter_video(item, index, vid_stride)
            else:
                yield decode_item(item, index)
        return
    yield from _decode_in_pool(items, workers, prefetch, vid_stride)


def iter_video(item: InputItem, index: int, stride: int) -> Iterator[Decodable]:
    """A video's frames then its `InputDone`; an unreadable video is one `Decoded` error."""
    frames = 0
    try:
        reader = VideoReader(item.path, stride)
        for frame in reader:
            frames += 1
            yield Decoded(item, index, frame.image, None, frame.index, frame.timestamp, reader.info.fps / stride)
    except ImageReadError as exc:
        if frames == 0:
            yield Decoded(item, index, None, exc.reason)
            return
    yield InputDone(item, index, frames, reader.ended_early(), reader.info.fps)


def _decode_in_pool(items: Sequence[InputItem], workers: int, prefetch: int, stride: int) -> Iterator[Decodable]:
    todo = enumerate(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segcli-decode")
    # Images are futures; a video is a (item, index) placeholder read by its own thread when its turn comes.
    pending: deque[Future[Decoded] | tuple[InputItem, int]] = deque()

    def submit(index: int, item: InputItem) -> None:
        pending.append((item, index) if item.is_video else pool.submit(decode_item, item, index))

    try:
        for index, item in islice(todo, prefetch):
            submit(index, item)
        while pending:
            head = pending.popleft()
            # Refill before yielding, so decoding goes on while the consumer runs the model.
            for index, item in islice(todo, 1):
                submit(index, item)
            if isinstance(head, tuple):
                yield from _threaded(iter_video(head[0], head[1], stride), prefetch)
            else:
                yield head.result()
    finally:
        # Queued work is dropped; running decodes are short and finite, so waiting cannot hang.
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()


def _threaded(frames: Iterator[Decodable], size: int) -> Iterator[Decodable]:
    """Run `frames` in a thread, `size` items ahead at most; closing the consumer stops the thread."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def produce() -> None:
        try:
            for value in frames:
                while not stop.is_set():
                    try:
                        buffer.put(value, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_END)
        except BaseException as exc:  # a bug in the reader: hand it to the consumer to raise
            buffer.put(exc)
        finally:
            frames.close()

    thread = threading.Thread(target=produce, name="segcli-video", daemon=True)
    thread.start()
    try:
        while True:
            value = buffer.get()
            if value is _END:
                return
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
