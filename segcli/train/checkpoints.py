"""What a run leaves in its folder: last.pt (with everything --resume needs), best.pt, and
metrics.jsonl; and the random state that makes a resumed run continue exactly."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from segcli.atomic import atomic_write
from segcli.errors import WeightsError


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resume_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: say which and why
        raise WeightsError(f"cannot resume from {path}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or "training" not in state or "model" not in state:
        raise WeightsError(f"cannot resume from {path}: it is not a segcli training checkpoint")
    return state


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def trim_metrics(path: Path, start_epoch: int) -> None:
    """On resume, drop lines of epochs that will be trained again (a run killed mid-epoch)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("epoch", 0) <= start_epoch:
                kept.append(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    with atomic_write(path, "w") as handle:
        handle.write("".join(k + "\n" for k in kept))
