"""Run several batches through the model at once on the CPU ("streams"), results in input order.

On a CPU one model call keeps every core busy only in its convolutions: NMS, the per-image
Python, the mask paste and RLE encoding run on one thread while the other cores wait. OpenVINO's
throughput mode fills those gaps by running several inference requests side by side, each on
fewer threads; this does the same for segcli's own model. Each stream is a thread with its own
intra-op thread count (OpenMP's thread count is a per-thread setting, which torch.set_num_threads
sets for the calling thread), so two streams of one thread each on 2 cores run two images at a
time instead of one image on two threads.

Events leave in the order they came, and every image is predicted alone (or with its own batch),
so the results are those of one stream run on the same number of threads per stream: float32
results do not depend on the thread count at all, bf16 ones do (oneDNN splits its sums by
thread), so `--streams 2` on 2 cores gives a 1-thread run's bf16 detections.

Measured (benchmarks/cpu_runtimes.py's machine, 2 cores, 12 coco_tiny photos, rounds taking
turns): the small demo model 1.15x (1.00..1.80) in bf16 and int8; R50-FPN 1.00x (0.95..1.07),
whose convolutions already keep both cores busy. So one stream stays the default.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

import torch


def threads_per_stream(streams: int) -> int:
    """Intra-op threads of each stream: this process's threads shared out, at least one each."""
    return max(1, torch.get_num_threads() // streams)


def predicted(events: Iterable, predict, streams: int) -> Iterator[tuple[object, list | None]]:
    """(event, its results) for every event of `events`, in order: batches (lists) get
    `predict(batch)`, up to `streams` of them in flight; other events (an input done, an input
    failed) get None and leave after every batch before them."""
    if streams <= 1:
        for event in events:
            yield event, predict(event) if isinstance(event, list) else None
        return
    threads = threads_per_stream(streams)
    pool = ThreadPoolExecutor(streams, thread_name_prefix="segcli-stream",
                              initializer=torch.set_num_threads, initargs=(threads,))
    main_threads = torch.get_num_threads()
    pending: deque[tuple[object, Future | None]] = deque()
    try:
        for event in events:
            while sum(future is not None for _, future in pending) >= streams:
                yield _resolved(pending.popleft())
            pending.append((event, pool.submit(predict, event) if isinstance(event, list) else None))
            while pending and pending[0][1] is None:  # nothing before it is still running
                yield _resolved(pending.popleft())
        while pending:
            yield _resolved(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a stream still running finishes its batch
        torch.set_num_threads(main_threads)  # the workers' setting also changed torch's default


def _resolved(entry: tuple[object, Future | None]) -> tuple[object, list | None]:
    event, future = entry
    return event, None if future is None else future.result()

