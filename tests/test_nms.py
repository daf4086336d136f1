"""Padded-group NMS must keep exactly what torchvision keeps, group by group."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, nms

from segcli.ops.iou_threshold import float32_threshold
from segcli.ops.nms import nms_padded


def clustered_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    centres = torch.rand(6, 2, generator=generator) * 200
    pick = torch.randint(0, 6, (n,), generator=generator)
    xy = centres[pick] + torch.randn(n, 2, generator=generator) * 6
    wh = 20 + torch.rand(n, 2, generator=generator) * 30
    return torch.cat([xy, xy + wh], dim=1)


def padded_groups(groups: int, k: int, seed: int, classes: int | None):
    g = torch.Generator().manual_seed(seed)
    boxes = clustered_boxes(groups * k, g).view(groups, k, 4)
    scores = torch.rand(groups, k, generator=g)
    valid = torch.rand(groups, k, generator=g) > 0.2
    valid[0] = False  # a group with nothing in it
    labels = torch.randint(0, classes, (groups, k), generator=g) if classes else None
    order = scores.argsort(dim=1, descending=True)
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    scores = scores.gather(1, order)
    valid = valid.gather(1, order)
    if labels is not None:
        labels = labels.gather(1, order)
    return boxes, scores, valid, labels


def torchvision_keep(boxes, scores, valid, labels, threshold) -> torch.Tensor:
    keep = torch.zeros_like(valid)
    for g in range(boxes.shape[0]):
        index = torch.nonzero(valid[g]).squeeze(1)
        if labels is None:
            kept = nms(boxes[g, index], scores[g, index], threshold)
        else:
            kept = batched_nms(boxes[g, index], scores[g, index], labels[g, index], threshold)
        keep[g, index[kept]] = True
    return keep


def test_matches_torchvision_per_group_class_agnostic_and_class_aware():
    for seed, classes, threshold in [(0, None, 0.7), (1, 3, 0.5), (2, 3, 0.3), (3, None, 0.5)]:
        boxes, scores, valid, labels = padded_groups(5, 120, seed, classes)
        expected = torchvision_keep(boxes, scores, valid, labels, threshold)
        got = nms_padded(boxes, valid, labels, threshold)
        assert torch.equal(got, expected), (seed, classes, threshold)
        assert expected.sum() < valid.sum()  # suppression really happened


def test_strict_comparison_at_the_threshold():
    # IoU of these two boxes is exactly 0.5: '>' must not suppress at 0.5, but must at 0.49.
    boxes = torch.tensor([[[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0], [0.0, 0.0, 3.0, 1.0]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert nms_padded(boxes, valid, None, 0.5).tolist() == [[True, True, False]]
    assert nms_padded(boxes, valid, None, 0.49).tolist() == [[True, False, False]]


def test_threshold_rounding_follows_torchvision_double_comparison():
    for threshold in (0.3, 0.5, 0.7, 0.05):
        t32 = torch.tensor(float32_threshold(threshold), dtype=torch.float32)
        probes = torch.stack([torch.nextafter(t32, torch.tensor(0.0)), t32, torch.nextafter(t32, torch.tensor(1.0))])
        assert ((probes > float32_threshold(threshold)) == (probes.double() > threshold)).all()


def test_chain_of_suppressions_follows_the_greedy_order():
    # Box i overlaps i+1 only: greedy keeps 0, 2, 4, ... (suppressed boxes suppress nothing).
    xs = torch.arange(12, dtype=torch.float32) * 0.6
    boxes = torch.stack([xs, torch.zeros(12), xs + 1.0, torch.ones(12)], dim=1)[None]
    keep = nms_padded(boxes, torch.ones(1, 12, dtype=torch.bool), None, 0.2)
    assert keep[0].tolist() == [i % 2 == 0 for i in range(12)]


def test_empty_groups():
    assert nms_padded(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), None, 0.5).shape == (2, 0)
