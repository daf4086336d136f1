"""Region proposal network: the head's scores and deltas -> the best proposals of every image.

Batched over images: top-k per level runs on [B, N_level] tensors, NMS on padded (image, level)
groups in one call, and the merge across levels is one top-k per image. Proposals come out as a
fixed-size [B, post_nms_top_n] block with a validity mask, so nothing waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.rpn import RPNHead

from segcli.model.anchors import AnchorGenerator
from segcli.model.boxes import clip_boxes, decode_boxes, large_enough
from segcli.ops.nms import nms_padded

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class RPNSettings:
    pre_nms_top_n: int = 1000  # per level and image
    post_nms_top_n: int = 1000  # per image
    nms_threshold: float = 0.7
    min_size: float = 1e-3


@dataclass
class Proposals:
    boxes: Tensor  # [B, P, 4] in resized-image coordinates
    valid: Tensor  # [B, P] bool; invalid slots hold zero boxes and are ignored downstream


def flatten_level(objectness: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """[B, A, H, W], [B, A*4, H, W] -> [B, H*W*A], [B, H*W*A, 4] in anchor order."""
    b, a, h, w = objectness.shape
    scores = objectness.permute(0, 2, 3, 1).reshape(b, -1)
    deltas = deltas.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
    return scores, deltas


class RegionProposalNetwork(nn.Module):
    def __init__(self, head: nn.Module, anchor_generator: AnchorGenerator, settings: RPNSettings) -> None:
        super().__init__()
        self.head = head  # torchvision's RPNHead, so checkpoint keys stay "rpn.head.*"
        self.anchor_generator = anchor_generator
        self.settings = settings

    def head_outputs(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The head's 3x3 convs run in the model's precision; its two 1x1 output layers in float32,
        because top-k over ~100k bf16 logits (8-bit mantissa) would be decided by ties."""
        if not isinstance(self.head, RPNHead):  # a fused CPU head (segcli.model.cpu_fusion) does the same itself
            return self.head(features)
        objectness, deltas = [], []
        for feature in features:
            hidden = self.head.conv(feature)
            with torch.autocast(hidden.device.type, enabled=False):
                hidden = hidden.float()
                objectness.append(self.head.cls_logits(hidden))
                deltas.append(self.head.bbox_pred(hidden))
        return objectness, deltas

    def forward(self, features: list[Tensor], padded_size: tuple[int, int], image_sizes: Tensor) -> Proposals:
        objectness, deltas = self.head_outputs(features)
        anchors = self.anchors(features, padded_size)
        s = self.settings
        return self.propose(objectness, deltas, anchors, image_sizes, s.pre_nms_top_n, s.post_nms_top_n)

    def anchors(self, features: list[Tensor], padded_size: tuple[int, int]) -> list[Tensor]:
        return self.anchor_generator(padded_size, [tuple(f.shape[-2:]) for f in features], features[0].device)

    def propose(self, objectness: list[Tensor], deltas: list[Tensor], anchors: list[Tensor], image_sizes: Tensor,
                pre_nms_top_n: int, post_nms_top_n: int) -> Proposals:
        """The best `post_nms_top_n` boxes per image from the `pre_nms_top_n` best of each level."""
        s = self.settings
        batch = objectness[0].shape[0]
        k = pre_nms_top_n
        level_boxes, level_scores, level_valid = [], [], []
        for level_objectness, level_deltas, level_anchors in zip(objectness, deltas, anchors):  # FPN levels
            scores, level_deltas = flatten_level(level_objectness.float(), level_deltas.float())
            top_scores, top_index = scores.topk(min(k, scores.shape[1]), dim=1)
            top_deltas = level_deltas.gather(1, top_index[..., None].expand(-1, -1, 4))
            boxes = decode_boxes(top_deltas, level_anchors[top_index], RPN_BOX_WEIGHTS)[:, :, 0]
            boxes = clip_boxes(boxes, image_sizes)
            valid = large_enough(boxes, s.min_size)
            pad = k - boxes.shape[1]  # small levels have fewer than k anchors
            level_boxes.append(nn.functional.pad(boxes, (0, 0, 0, pad)))
            level_scores.append(nn.functional.pad(torch.sigmoid(top_scores), (0, pad), value=-1.0))
            level_valid.append(nn.functional.pad(valid, (0, pad), value=False))
        num_levels = len(objectness)
        boxes = torch.stack(level_boxes, 1)  # [B, L, k, 4]
        scores = torch.stack(level_scores, 1)
        valid = torch.stack(level_valid, 1)
        # Groups are (image, level): torchvision runs NMS per image with the level as the class.
        keep = nms_padded(boxes.view(batch * num_levels, k, 4), valid.view(-1, k), None, s.nms_threshold)
        scores = torch.where(keep.view(batch, num_levels, k), scores, torch.full_like(scores, -1.0))
        best_scores, best = scores.view(batch, -1).topk(min(post_nms_top_n, num_levels * k), dim=1)
        best_boxes = boxes.view(batch, -1, 4).gather(1, best[..., None].expand(-1, -1, 4))
        best_valid = best_scores >= 0
        best_boxes = torch.where(best_valid[..., None], best_boxes, torch.zeros_like(best_boxes))
        return Proposals(boxes=best_boxes, valid=best_valid)
