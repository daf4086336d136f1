"""Built-in verification: the eager model and the exported file, run on the same real photos,
must give the same detections under the project's parity contract (segcli.model.parity: same
label, box corners within 0.5 px, score within 1e-3, mask IoU at least 0.98).

Each sample runs alone, and all samples run once more as one batch (exercising the batch
dimension and mixed sizes). Masks are compared as the models output them: 28x28 probabilities
thresholded at 0.5 (pasting is shared code after that). As in the core parity tests, at least
98% of the detections must match: a score or IoU that sits on a threshold may flip one detection
between two correct float implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from segcli.model.maskrcnn import Detections, MaskRCNN
from segcli.model.parity import ParityReport, compare_detections

MIN_MATCH_FRACTION = 0.98


@dataclass
class Verification:
    reports: list[tuple[str, ParityReport]] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return sum(r.matched for _, r in self.reports)

    @property
    def total(self) -> int:
        return sum(max(r.reference_count, r.candidate_count) for _, r in self.reports)

    @property
    def passed(self) -> bool:
        return self.total == 0 or self.matched / self.total >= MIN_MATCH_FRACTION

    def worst(self) -> tuple[str, ParityReport]:
        return min(self.reports, key=lambda item: item[1].fraction)

    def __str__(self) -> str:
        runs = len(self.reports)
        return f"{self.matched} of {self.total} detections match the eager model over {runs} image run{'' if runs == 1 else 's'}"


def collate(images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    sizes = [(im.shape[0], im.shape[1]) for im in images]
    batch = torch.zeros((len(images), max(s[0] for s in sizes), max(s[1] for s in sizes), 3), dtype=torch.uint8)
    for i, image in enumerate(images):
        batch[i, : image.shape[0], : image.shape[1]] = torch.as_tensor(image)
    return batch, sizes


def _compare(reference: Detections, candidate: Detections, image: int) -> ParityReport:
    ref, cand = reference.rows(image), candidate.rows(image)
    return compare_detections(
        reference.boxes[ref], reference.scores[ref], reference.labels[ref], reference.mask_probs[ref] > 0.5,
        candidate.boxes[cand], candidate.scores[cand], candidate.labels[cand], candidate.mask_probs[cand] > 0.5,
    )


def verify_export(eager: MaskRCNN, exported, samples: list[tuple[str, np.ndarray]]) -> Verification:
    """Compare `exported` (called like MaskRCNN) with `eager` on each sample alone and on all together."""
    result = Verification()
    runs = [[i] for i in range(len(samples))] + ([list(range(len(samples)))] if len(samples) > 1 else [])
    for run in runs:
        batch, sizes = collate([samples[i][1] for i in run])
        with torch.inference_mode():
            reference = eager(batch, sizes)
            candidate = exported(batch, sizes)
        for position, index in enumerate(run):
            label = samples[index][0] + (f" (in a batch of {len(run)})" if len(run) > 1 else "")
            result.reports.append((label, _compare(reference, candidate, position)))
    return result
