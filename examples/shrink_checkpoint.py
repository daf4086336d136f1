"""Make a `segcli train` checkpoint small enough to ship: float16 weights, no optimizer state.

    python examples/shrink_checkpoint.py runs/demo/best.pt weights/my_model.pt

Weights are stored in half precision (half the bytes) and loaded back into the float32 model by
`load_state_dict`, which converts them; the architecture, categories, input size and training
metadata are kept. The optimizer and resume state are dropped, so the result cannot be resumed.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from segcli.weights import save_checkpoint


def shrink(source: Path, dest: Path) -> str:
    """Write the small checkpoint; returns its SHA-256 (for a registry entry)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    meta = dict(checkpoint.get("meta") or {}, stored_as="float16 weights (examples/shrink_checkpoint.py)")
    save_checkpoint(dest, state, checkpoint["arch"], checkpoint["categories"], checkpoint["label_to_category_id"], meta)
    return hashlib.sha256(dest.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    digest = shrink(args.source, args.dest)
    print(f"{args.dest}: {args.dest.stat().st_size / 1e6:.1f} MB, sha256 {digest}")


if __name__ == "__main__":
    main()
