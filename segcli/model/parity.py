"""Do two sets of detections of one image agree? Used by the parity tests (segcli vs torchvision)
and by export verification (eager vs exported model).

Tolerance (the project's parity contract): same label, box corners within 0.5 px, score within
1e-3, mask IoU at least 0.98.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BOX_TOLERANCE = 0.5
SCORE_TOLERANCE = 1e-3
MASK_IOU_MIN = 0.98


@dataclass
class ParityReport:
    matched: int
    reference_count: int
    candidate_count: int

    @property
    def fraction(self) -> float:
        total = max(self.reference_count, self.candidate_count)
        return 1.0 if total == 0 else self.matched / total

    def __str__(self) -> str:
        return (
            f"{self.matched} of {max(self.reference_count, self.candidate_count)} detections match "
            f"({self.fraction:.1%}; reference {self.reference_count}, candidate {self.candidate_count})"
        )


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of bool masks [N, ...] pairwise by row; two empty masks agree (IoU 1)."""
    a, b = a.flatten(1), b.flatten(1)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def compare_detections(
    ref_boxes: Tensor, ref_scores: Tensor, ref_labels: Tensor, ref_masks: Tensor,
    boxes: Tensor, scores: Tensor, labels: Tensor, masks: Tensor,
) -> ParityReport:
    """Match each reference detection to an unmatched candidate within tolerance (closest box first)."""
    ok = (ref_labels[:, None] == labels[None, :])
    box_diff = (ref_boxes[:, None, :] - boxes[None, :, :]).abs().amax(-1)
    ok &= box_diff <= BOX_TOLERANCE
    ok &= (ref_scores[:, None] - scores[None, :]).abs() <= SCORE_TOLERANCE
    taken = torch.zeros(len(boxes), dtype=torch.bool)
    matched = 0
    for i in range(len(ref_boxes)):  # a test-side check over <= 100 detections, not a hot path
        cost = torch.where(ok[i] & ~taken, box_diff[i], torch.full_like(box_diff[i], float("inf")))
        if len(cost) == 0 or not torch.isfinite(cost.min()):
            continue
        j = int(cost.argmin())
        if mask_iou(ref_masks[i : i + 1], masks[j : j + 1])[0] >= MASK_IOU_MIN:
            taken[j] = True
            matched += 1
    return ParityReport(matched=matched, reference_count=len(ref_boxes), candidate_count=len(boxes))
