"""Anchors of every FPN level, computed once per feature-map size and device, then reused."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

CACHE_SIZE = 16


class AnchorGenerator(nn.Module):
    """One anchor size per level, several aspect ratios; order per level is (y, x, anchor) as in
    torchvision, so anchors line up with the flattened RPN head outputs."""

    def __init__(self, sizes: Sequence[int], aspect_ratios: Sequence[float]) -> None:
        super().__init__()
        self.sizes = tuple(sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    def base_anchors(self, size: int, device: torch.device) -> Tensor:
        ratios = torch.as_tensor(self.aspect_ratios, dtype=torch.float32, device=device)
        scales = torch.as_tensor([size], dtype=torch.float32, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def forward(self, padded_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Anchors [H_l * W_l * A, 4] per level for a padded input of `padded_size`."""
        key = (padded_size, tuple(feature_sizes), str(device))
        cached = self._cache.get(key)
        if cached is None:
            cached = []
            for size, (h, w) in zip(self.sizes, feature_sizes):
                stride_y, stride_x = padded_size[0] // h, padded_size[1] // w
                shift_x = torch.arange(0, w, dtype=torch.int32, device=device) * stride_x
                shift_y = torch.arange(0, h, dtype=torch.int32, device=device) * stride_y
                sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
                shifts = torch.stack((sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)), dim=1)
                cached.append((shifts.view(-1, 1, 4) + self.base_anchors(size, device).view(1, -1, 4)).reshape(-1, 4))
            if len(self._cache) >= CACHE_SIZE:  # a folder has few distinct sizes; drop the oldest
                self._cache.pop(next(iter(self._cache), None), None)  # two --streams may drop the same one
            self._cache[key] = cached
        return cached
