"""The whole Mask R-CNN pipeline, uint8 images -> detections, written so that tracing records it
for every batch and image size (TorchScript and ONNX are both traced from this module).

It computes what `MaskRCNN.forward` computes, with the same weights and formulas, but:

- every size is read from tensors (`_shape_as_tensor`) and every size-dependent quantity (resize
  scale, padding, anchors, feature strides) is tensor arithmetic, so nothing freezes at the traced
  size; Python loops run only over constants (FPN levels);
- data-dependent counts are replaced by fixed sizes: each level's top-k runs over the level plus k
  padding entries, and the detection stage takes a fixed number of candidates (`candidate_cap`,
  as CUDA predict does);
- ops are the exportable ones: torchvision's `roi_align` per level (ONNX RoiAlign) instead of the
  eager embedding_bag gather, and NMS from `segcli.export.nms` (a scripted loop for TorchScript,
  ONNX's NonMaxSuppression for ONNX);
- the mask stage always runs on at least one RoI (a dummy one, dropped afterwards), so images
  without detections never hand an empty batch to a convolution.

Inputs: images uint8 [B, H, W, 3] (image i in [:h_i, :w_i], the rest ignored) and sizes int64
[B, 2] of (h, w). Outputs, concatenated over images and best first within each image: boxes
[N, 4] xyxy in original pixels, scores [N], labels [N] (model label indices), masks [N, 28, 28]
(probabilities inside each box, pasted by the caller) and image_index [N].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from segcli.export.nms import nms_groups_by_label_script, nms_groups_onnx, nms_groups_script
from segcli.model.boxes import clip_boxes, decode_boxes, large_enough
from segcli.model.maskrcnn import MaskRCNN
from segcli.model.preprocess import IMAGE_MEAN, IMAGE_STD, SIZE_DIVISIBLE
from segcli.model.roi_heads import BOX_POOL_SIZE, MASK_POOL_SIZE, ROI_BOX_WEIGHTS, SAMPLING_RATIO, own_class_logits
from segcli.model.rpn import RPN_BOX_WEIGHTS
from segcli.ops.roi_align import assign_levels

BACKENDS = ("torchscript", "onnx")
# RoIAlign levels: FPN outputs of strides 4..32 (the stride-64 "pool" level only feeds the RPN).
ROI_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
ROI_FIRST_LEVEL = 2
OUTPUT_NAMES = ("boxes", "scores", "labels", "masks", "image_index")
INPUT_NAMES = ("images", "sizes")


def floor_div(a: Tensor, b: Tensor | int) -> Tensor:
    """a // b for non-negative int64 tensors below 2**20, as float32 division and floor.

    Not the integer `//` (an integer Div or Mod in ONNX): OpenVINO's CPU plugin runs those through
    float32 with round-to-nearest, so 287 // 32 came out 9 there (openvinotoolkit/openvino#35830,
    #37766), padding the input by 32 more pixels and moving every anchor. The float quotient of such
    small integers is exact, or at least 1/b away from the next integer, so its floor is exact."""
    b = b.to(torch.float32) if isinstance(b, Tensor) else float(b)
    return torch.floor(a.to(torch.float32) / b).to(torch.int64)


def resize_taps(src: Tensor, dst: Tensor, out_len: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis (align_corners=False, as F.interpolate), per image: source
    indices i0, i1 [B, out_len] and their weights w0, w1, which are zero past dst[b] (the padding)."""
    pos = torch.arange(out_len, device=src.device).to(torch.float32)
    scale = src.to(torch.float32) / dst.to(torch.float32)
    source = ((pos[None, :] + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    last = (src - 1)[:, None]
    i0 = torch.minimum(source.to(torch.int64), last)
    i1 = torch.minimum(i0 + 1, last)
    lam = source - i0.to(torch.float32)
    inside = (pos[None, :] < dst[:, None].to(torch.float32)).to(torch.float32)
    return i0, i1, (1.0 - lam) * inside, lam * inside


def resize_axis(x: Tensor, taps: tuple[Tensor, Tensor, Tensor, Tensor], dim: int) -> Tensor:
    """Resize [B, C, H, W] along `dim` (2 or 3) with per-image taps: two gathers, so the cost
    follows the output size, not input x output as a resize matrix's would on large photos."""
    i0, i1, w0, w1 = taps
    shape = [-1, x.shape[1], -1, -1]
    if dim == 2:
        index0, index1 = i0[:, None, :, None], i1[:, None, :, None]
        weight0, weight1 = w0[:, None, :, None], w1[:, None, :, None]
        shape[3] = x.shape[3]
    else:
        index0, index1 = i0[:, None, None, :], i1[:, None, None, :]
        weight0, weight1 = w0[:, None, None, :], w1[:, None, None, :]
        shape[2] = x.shape[2]
    return torch.gather(x, dim, index0.expand(shape)) * weight0 + torch.gather(x, dim, index1.expand(shape)) * weight1


def resized_sizes(sizes: Tensor, min_size: float, max_size: float) -> Tensor:
    """[B, 2] int64 (h, w) after torchvision's resize rule, in float64 as preprocess.ResizePolicy
    computes it in Python. Tensor / tensor on purpose: `number / tensor` runs as number *
    reciprocal(tensor), one ulp off IEEE division, which floored 425 * (800 / 425) to 799 rows where
    eager and torchvision have 800, and the exported R50 matched none of their detections there."""
    size_f = sizes.to(torch.float64)
    shortest, longest = size_f.min(1).values, size_f.max(1).values
    scale = torch.minimum(torch.full_like(shortest, min_size) / shortest, torch.full_like(longest, max_size) / longest)
    return torch.floor(size_f * scale[:, None]).to(torch.int64).clamp(min=1)  # never 0, as ResizePolicy


class ExportableMaskRCNN(nn.Module):
    def __init__(self, model: MaskRCNN, backend: str, candidate_cap: int) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}")
        self.backend = backend
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head
        heads = model.roi_heads
        self.box_head, self.box_predictor = heads.box_head, heads.box_predictor
        self.mask_head, self.mask_predictor = heads.mask_head, heads.mask_predictor
        self.rpn_settings = model.rpn.settings
        self.settings = heads.settings
        self.min_size, self.max_size = float(model.resize.min_size), float(model.resize.max_size)
        num_labels = heads.box_predictor.cls_score.out_features - 1
        self.num_labels = num_labels
        allowed = heads.allowed_labels if heads.allowed_labels is not None else torch.ones(num_labels, dtype=torch.bool)
        self.register_buffer("allowed_labels", allowed.clone().cpu())
        generator = model.rpn.anchor_generator
        for level, size in enumerate(generator.sizes):  # constant per level: only the shifts depend on the size
            self.register_buffer(f"base_anchors_{level}", generator.base_anchors(size, torch.device("cpu")))
        self.num_levels = len(generator.sizes)
        self.candidate_count = min(candidate_cap, self.rpn_settings.post_nms_top_n * num_labels)
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN)[:, None, None])
        self.register_buffer("std", torch.tensor(IMAGE_STD)[:, None, None])

    # -- preprocessing ---------------------------------------------------------------------------
    def preprocess(self, images: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized, resized, padded input [B, 3, Hp, Wp] and resized sizes [B, 2]."""
        # torchvision's scale rule in float64, as Python computes it in preprocess.ResizePolicy.
        resized = resized_sizes(sizes, self.min_size, self.max_size)
        padded = floor_div(resized.max(0).values + (SIZE_DIVISIBLE - 1), SIZE_DIVISIBLE) * SIZE_DIVISIBLE
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        # Rows, then columns; rows past each image's resized size get zero weights: the padding.
        x = resize_axis(x, resize_taps(sizes[:, 0], resized[:, 0], padded[0]), 2)
        x = resize_axis(x, resize_taps(sizes[:, 1], resized[:, 1], padded[1]), 3)
        return x, resized

    # -- region proposals ------------------------------------------------------------------------
    def anchors(self, level: int, feature: Tensor, padded: Tensor) -> Tensor:
        shape = torch._shape_as_tensor(feature)
        height, width = shape[2], shape[3]
        stride_y, stride_x = floor_div(padded[0], height), floor_div(padded[1], width)
        shift_x = torch.arange(width, device=feature.device) * stride_x
        shift_y = torch.arange(height, device=feature.device) * stride_y
        sx = (shift_x[None, :] + 0 * shift_y[:, None]).reshape(-1)
        sy = (shift_y[:, None] + 0 * shift_x[None, :]).reshape(-1)
        shifts = torch.stack((sx, sy, sx, sy), dim=1).to(torch.float32)
        base = getattr(self, f"base_anchors_{level}")
        return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)

    def proposals(self, features: list[Tensor], padded: Tensor, resized: Tensor) -> tuple[Tensor, Tensor]:
        s, k = self.rpn_settings, self.rpn_settings.pre_nms_top_n
        level_boxes, level_scores, level_valid = [], [], []
        for level, feature in enumerate(features):
            hidden = self.rpn_head.conv(feature)
            objectness = self.rpn_head.cls_logits(hidden)  # [B, A, H, W]
            deltas = self.rpn_head.bbox_pred(hidden)  # [B, A*4, H, W]
            batch = objectness.shape[0]
            scores = objectness.permute(0, 2, 3, 1).reshape(batch, -1)
            deltas = deltas.reshape(batch, -1, 4, deltas.shape[2], deltas.shape[3]).permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)
            anchors = self.anchors(level, feature, padded)
            # k padding entries make top-k's size fixed (k), whatever the level's size: they score
            # -inf and are marked invalid, as eager pads small levels.
            scores = torch.cat([scores, torch.full_like(scores[:, :1], float("-inf")).expand(-1, k)], 1)
            deltas = torch.cat([deltas, torch.zeros_like(deltas[:, :1]).expand(-1, k, -1)], 1)
            anchors = torch.cat([anchors, torch.zeros_like(anchors[:1]).expand(k, -1)], 0)
            top_scores, top_index = scores.topk(k, dim=1)
            top_deltas = deltas.gather(1, top_index[..., None].expand(-1, -1, 4))
            boxes = clip_boxes(decode_boxes(top_deltas, anchors[top_index], RPN_BOX_WEIGHTS)[:, :, 0], resized)
            valid = torch.isfinite(top_scores) & large_enough(boxes, s.min_size)
            level_boxes.append(torch.where(valid[..., None], boxes, torch.zeros_like(boxes)))
            level_scores.append(torch.where(valid, torch.sigmoid(top_scores), torch.full_like(top_scores, -1.0)))
            level_valid.append(valid)
        boxes = torch.stack(level_boxes, 1)  # [B, L, k, 4]
        scores = torch.stack(level_scores, 1)
        valid = torch.stack(level_valid, 1)
        keep = self.nms(boxes.reshape(-1, k, 4), valid.reshape(-1, k), None, s.nms_threshold).view_as(valid)
        scores = torch.where(keep, scores, torch.full_like(scores, -1.0)).flatten(1)
        best_scores, best = scores.topk(min(s.post_nms_top_n, self.num_levels * k), dim=1)
        best_boxes = boxes.flatten(1, 2).gather(1, best[..., None].expand(-1, -1, 4))
        best_valid = best_scores >= 0
        return torch.where(best_valid[..., None], best_boxes, torch.zeros_like(best_boxes)), best_valid

    def nms(self, boxes: Tensor, valid: Tensor, labels: Tensor | None, threshold: float) -> Tensor:
        """The export's NMS switch: a scripted loop of torchvision's kernel, or ONNX's operator."""
        if self.backend == "onnx":
            return nms_groups_onnx(boxes, valid, labels, self.num_labels, threshold)
        if labels is None:
            return nms_groups_script(boxes, valid, threshold)
        return nms_groups_by_label_script(boxes, valid, labels, threshold)

    # -- RoI heads -------------------------------------------------------------------------------
    @staticmethod
    def roi_pool(features: list[Tensor], boxes: Tensor, batch_index: Tensor, output_size: int) -> Tensor:
        """Multi-level RoIAlign: each box pooled from its FPN level with torchvision's kernel."""
        levels = assign_levels(boxes, ROI_FIRST_LEVEL, ROI_FIRST_LEVEL + len(features) - 1)
        rois = torch.cat([batch_index[:, None].to(boxes.dtype), boxes], 1)
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(features, ROI_SCALES)):
            index = torch.nonzero(levels == level).squeeze(1)
            pooled.append(roi_align(feature, rois.index_select(0, index), output_size, scale, SAMPLING_RATIO, False))
            order.append(index)
        return torch.cat(pooled).index_select(0, torch.argsort(torch.cat(order)))

    def detect(self, features: list[Tensor], proposals: Tensor, proposal_valid: Tensor, resized: Tensor):
        s = self.settings
        batch, num_proposals = proposal_valid.shape[0], proposal_valid.shape[1]
        batch_index = (torch.arange(batch, device=proposals.device)[:, None] + 0 * proposal_valid.long()).reshape(-1)
        pooled = self.roi_pool(features, proposals.reshape(-1, 4), batch_index, BOX_POOL_SIZE)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        labels_total = self.num_labels
        boxes = decode_boxes(box_deltas, proposals.reshape(-1, 4), ROI_BOX_WEIGHTS)
        boxes = clip_boxes(boxes.reshape(batch, num_proposals, labels_total + 1, 4), resized)[:, :, 1:]
        scores = torch.softmax(class_logits, -1).reshape(batch, num_proposals, labels_total + 1)[:, :, 1:]
        candidate = (scores > s.score_threshold) & large_enough(boxes, s.min_size)
        candidate = candidate & proposal_valid[:, :, None] & self.allowed_labels[None, None, :]
        # Candidates in torchvision's order: proposal-major, class-minor.
        boxes, scores, candidate = boxes.reshape(batch, -1, 4), scores.reshape(batch, -1), candidate.reshape(batch, -1)
        scores = torch.where(candidate, scores, torch.full_like(scores, -1.0))
        sorted_scores, order = scores.topk(self.candidate_count, dim=1)
        sorted_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        sorted_labels = order - floor_div(order, labels_total) * labels_total + 1  # order % labels_total + 1
        keep = self.nms(sorted_boxes, sorted_scores > s.score_threshold, sorted_labels, s.nms_threshold)
        keep = keep & (torch.cumsum(keep.to(torch.int64), dim=1) <= s.max_detections)
        # The one data-dependent size: the kept detections, row-major (image, then best first).
        kept = torch.nonzero(keep)
        flat = kept[:, 0] * self.candidate_count + kept[:, 1]
        return (sorted_boxes.reshape(-1, 4).index_select(0, flat), sorted_scores.reshape(-1).index_select(0, flat),
                sorted_labels.reshape(-1).index_select(0, flat), kept[:, 0])

    def masks(self, features: list[Tensor], boxes: Tensor, labels: Tensor, image_index: Tensor) -> Tensor:
        # One dummy RoI keeps the mask stage's batch non-empty (some runtimes reject empty convolutions).
        dummy = torch.tensor([[0.0, 0.0, 32.0, 32.0]], device=boxes.device)
        boxes = torch.cat([boxes, dummy])
        labels = torch.cat([labels, labels.new_ones(1)])
        image_index = torch.cat([image_index, image_index.new_zeros(1)])
        pooled = self.roi_pool(features, boxes, image_index, MASK_POOL_SIZE)
        hidden = F.relu(self.mask_predictor.conv5_mask(self.mask_head(pooled)))
        return torch.sigmoid(own_class_logits(self.mask_predictor.mask_fcn_logits, hidden, labels))[:-1]

    def forward(self, images: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        x, resized = self.preprocess(images, sizes)
        padded = torch._shape_as_tensor(x)[2:]
        features = list(self.backbone(x).values())
        proposals, valid = self.proposals(features, padded, resized)
        roi_features = features[:-1]
        boxes, scores, labels, image_index = self.detect(roi_features, proposals, valid, resized)
        masks = self.masks(roi_features, boxes, labels, image_index)
        # Boxes back to original pixels with torchvision's float32 ratios.
        ratio = (sizes.to(torch.float32) / resized.to(torch.float32)).index_select(0, image_index)
        boxes = boxes * ratio[:, [1, 0, 1, 0]]
        return boxes, scores, labels, masks, image_index
