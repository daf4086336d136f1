"""torchrun's environment as a value, and joining its process group: shared by `segcli train` and
`segcli predict` under torchrun, so neither reaches into the other."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from segcli.device import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> Dist:
    """torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(dist: Dist, device_spec: str) -> torch.device:
    device = resolve_device(device_spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    if dist.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def leave_distributed() -> None:
    """Destroy the process group once this rank's work is done. Left to the interpreter's teardown,
    Gloo's worker threads can be destroyed while still joinable, and the rank then aborts with
    SIGABRT ("terminate called without an active exception") after it has written everything, so
    torchrun reports a failed run. Call it on success only: destroying the group while another rank
    is still inside a collective can hang."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
