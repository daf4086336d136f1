"""`torchrun --nproc-per-node G -m segcli predict ...`: every rank predicts its slice of the inputs
on its own GPU (`LOCAL_RANK`), and rank 0 writes the one output, the same bytes as one process.

Each rank is a shard run (segcli.predict.shards) whose part goes into a hidden folder beside
`--out` (`.preds.json.ranks/part-2-of-4.json`, with its own resume journal); once all ranks are
done, rank 0 merges the parts into `--out` (segcli.predict.merge) and removes them, keeping the
journals for `--resume`. Per-image formats need no merge: every rank writes into the `--out` folder.
With `--shard K/N` as well (a Slurm array of multi-GPU jobs), the ranks split shard K, and the
merged file is that shard's part, ready for `segcli merge`.

The ranks talk over gloo whatever the device: inference exchanges nothing but each rank's summary
at the end, and gloo's timeout can be set long enough for the slowest rank (NCCL's watchdog would
kill a rank that waits hours at the final barrier while another finishes a long video).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TextIO

import torch

from segcli.device import resolve_device
from segcli.predict.merge import merge_parts
from segcli.predict.shards import ShardSpec, record_path
from segcli.distributed import dist_from_env, init_distributed, leave_distributed
from segcli.errors import UsageError
from segcli.predict.plan import plan_output
from segcli.predict.single import run_single

# The fastest rank waits at the final barrier for the slowest: a day's difference is allowed.
BARRIER_TIMEOUT = timedelta(days=1)


def rank_parts_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.ranks"


def run_ranks(options, stdin: TextIO | None, stderr: TextIO):
    """This rank's share of `options` (a PredictOptions); on rank 0 the summary of all ranks."""
    dist = dist_from_env()
    if options.ray is not None:
        raise UsageError("--ray and torchrun both spread the work; use one")
    if options.review is not None:  # every rank would write its own part of the queue over the others'
        raise UsageError("--review under torchrun: predict with a lower --score-thr, then rank the output "
                         "with segcli review")
    if "-" in options.sources:
        raise UsageError("under torchrun every rank reads the SOURCEs: give the paths in a .txt list, not on stdin (-)")
    plan = plan_output(options)
    if plan.out is None:
        raise UsageError("under torchrun, give --out a file or folder: the ranks cannot share stdout")
    wanted = resolve_device(options.device)
    if wanted.type == "cuda" and wanted.index is None and dist.local_rank >= torch.cuda.device_count():
        raise UsageError(f"torchrun started rank {dist.local_rank} on a machine with {torch.cuda.device_count()} "
                         f"GPU(s): each rank takes its own GPU, so give --nproc-per-node at most that")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    device = init_distributed(dist, options.device)  # training's choice: cuda:LOCAL_RANK, else the CPU
    rank = ShardSpec(dist.rank + 1, dist.world_size)
    mine = replace(options, rank=rank, device=str(device), quiet=options.quiet or not dist.is_main,
                   progress=options.progress if dist.is_main else False)
    parts = [rank_parts_dir(plan.out) / f"part-{r + 1}-of-{dist.world_size}{plan.out.suffix}"
             for r in range(dist.world_size)]
    if not plan.per_image:
        mine = replace(mine, out=str(parts[dist.rank]), format=plan.format)
    summary = run_single(mine, stdin, stderr)
    summaries = [None] * dist.world_size if dist.is_main else None
    torch.distributed.gather_object(summary, summaries, dst=0)
    if dist.is_main and not plan.per_image:
        merge_parts(parts, plan.out, allow_partial=options.shard is not None, label=options.shard)
        for part in parts:  # the journals beside them stay, for --resume
            for path in (part, record_path(part)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    # No rank leaves before the merge is written: torchrun stops every rank when one exits non-zero.
    torch.distributed.barrier()
    leave_distributed()
    return _combined(summaries) if dist.is_main else summary


def _combined(summaries: list):
    """Rank 0's summary (its own start-up timing; the files it ignored, which every rank ignored
    alike) with every rank's counts and failures, and the slowest rank's time."""
    total = replace(summaries[0], failures=list(summaries[0].failures), notes=list(summaries[0].notes))
    for summary in summaries[1:]:
        total.images += summary.images
        total.frames += summary.frames
        total.detections += summary.detections
        total.failures += summary.failures
        total.notes += summary.notes
        total.reused += summary.reused
        total.seconds = max(total.seconds, summary.seconds)
    return total
