"""`segcli predict`'s entry point: one process, or under torchrun (WORLD_SIZE > 1) this rank's
share of the inputs, merged on rank 0. See ARCHITECTURE.md for the whole flow."""

from __future__ import annotations

import os
from typing import TextIO

from segcli.data.images import max_pixels
from segcli.errors import UsageError
from segcli.predict.options import MAX_BATCH, MAX_STREAMS, PredictOptions, PredictSummary
from segcli.predict.single import run_single


def run_predict(options: PredictOptions, stdin: TextIO | None = None, stderr: TextIO | None = None) -> PredictSummary:
    """Run the whole prediction; raises SegcliError for user errors before any output is written."""
    if options.batch_size is not None and options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.batch_size is not None and options.batch_size > MAX_BATCH:
        raise UsageError(f"--batch-size must be at most {MAX_BATCH}, got {options.batch_size}")
    if options.workers is not None and options.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {options.workers}")
    if options.streams is not None and not 1 <= options.streams <= MAX_STREAMS:
        raise UsageError(f"--streams must be between 1 and {MAX_STREAMS}, got {options.streams}")
    max_pixels()  # a bad SEGCLI_MAX_PIXELS is one usage error now, not one per image later
    if options.rank is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from segcli.predict.torchrun import run_ranks  # each rank runs run_single with its own slice

        return run_ranks(options, stdin, stderr)
    return run_single(options, stdin, stderr)
