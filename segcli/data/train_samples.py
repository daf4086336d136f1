"""Training samples: decoded images with their targets, augmented, batched.

Every random choice (order, horizontal flips, the short side of each batch) is drawn in the main
process from a generator seeded by (seed, epoch), and travels with the indices to the loader
workers. So an epoch is the same whatever the number of workers, and a resumed run replays exactly
the epochs a run that was not interrupted would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from segcli.data.coco import CocoDataset, ImageRecord, decode_mask
from segcli.data.images import read_image
from segcli.model.training import Targets


@dataclass(frozen=True)
class SampleKey:
    index: int
    flip: bool
    min_size: int  # short side of the batch this sample belongs to


@dataclass
class Sample:
    image: np.ndarray  # [H, W, 3] uint8
    boxes: np.ndarray  # [G, 4] float32 xyxy
    labels: np.ndarray  # [G] int64
    masks: np.ndarray  # [G, H, W] uint8
    min_size: int


def load_sample(record: ImageRecord, flip: bool, min_size: int) -> Sample:
    image = read_image(record.path)
    height, width = image.shape[:2]
    boxes = np.array([i.box for i in record.instances], dtype=np.float32).reshape(-1, 4)
    labels = np.array([i.label for i in record.instances], dtype=np.int64)
    masks = np.zeros((len(record.instances), height, width), dtype=np.uint8)
    for row, instance in enumerate(record.instances):
        masks[row] = decode_mask(instance.segmentation, height, width)
    if flip:
        image = np.ascontiguousarray(image[:, ::-1])
        masks = np.ascontiguousarray(masks[:, :, ::-1])
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    return Sample(image, boxes, labels, masks, min_size)


class TrainingSet(torch.utils.data.Dataset):
    def __init__(self, dataset: CocoDataset) -> None:
        self.records = dataset.images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey) -> Sample:
        return load_sample(self.records[key.index], key.flip, key.min_size)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of SampleKeys for one epoch of one rank: a seeded permutation (padded so that every
    rank gets the same number of batches, as DistributedSampler does), flips and scales."""

    def __init__(self, size: int, batch_size: int, min_sizes: Sequence[int], flip: bool, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.size, self.batch_size, self.min_sizes, self.flip = size, batch_size, tuple(min_sizes), flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def per_rank(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: self.per_rank * self.world_size - self.size]  # pad, as DistributedSampler
        flips = (torch.rand(len(order), generator=generator) < 0.5).tolist()
        scales = torch.randint(len(self.min_sizes), (len(self), ), generator=generator).tolist()
        mine = list(range(self.rank, len(order), self.world_size))
        for batch in range(len(self)):
            positions = mine[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield [SampleKey(order[p], self.flip and flips[p], self.min_sizes[scales[batch]]) for p in positions]


@dataclass
class Batch:
    images: Tensor  # [B, Hmax, Wmax, 3] uint8
    sizes: list[tuple[int, int]]
    targets: Targets
    min_size: int

    def to(self, device: torch.device) -> "Batch":
        t = self.targets
        targets = Targets(t.boxes.to(device, non_blocking=True), t.labels.to(device, non_blocking=True),
                          t.masks.to(device, non_blocking=True))
        return Batch(self.images.to(device, non_blocking=True), self.sizes, targets, self.min_size)


def collate(samples: list[Sample]) -> Batch:
    """Pad images and masks to the batch's largest image and targets to its most crowded one."""
    height = max(s.image.shape[0] for s in samples)
    width = max(s.image.shape[1] for s in samples)
    count = max(1, max(len(s.labels) for s in samples))
    images = torch.zeros((len(samples), height, width, 3), dtype=torch.uint8)
    boxes = torch.zeros((len(samples), count, 4), dtype=torch.float32)
    labels = torch.zeros((len(samples), count), dtype=torch.int64)
    masks = torch.zeros((len(samples), count, height, width), dtype=torch.uint8)
    for i, s in enumerate(samples):
        h, w = s.image.shape[:2]
        n = len(s.labels)
        images[i, :h, :w] = torch.from_numpy(s.image)
        boxes[i, :n] = torch.from_numpy(s.boxes)
        labels[i, :n] = torch.from_numpy(s.labels)
        masks[i, :n, :h, :w] = torch.from_numpy(s.masks)
    sizes = [tuple(s.image.shape[:2]) for s in samples]
    return Batch(images, sizes, Targets(boxes, labels, masks), samples[0].min_size)
