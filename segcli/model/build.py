"""Builders: an architecture name and a class count -> a MaskRCNN module (plain functions, no registry)."""

from __future__ import annotations

from torch import nn
from torchvision.models import ResNet, resnet18, resnet50
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from segcli.errors import UsageError, WeightsError
from segcli.model.anchors import AnchorGenerator
from segcli.archs import ARCHS, ArchSpec
from segcli.model.maskrcnn import MaskRCNN
from segcli.model.preprocess import ResizePolicy
from segcli.model.roi_heads import DetectionSettings, RoIHeads
from segcli.model.rpn import RegionProposalNetwork, RPNSettings
from segcli.weights import Checkpoint

ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def build_body(spec: ArchSpec) -> ResNet:
    """torchvision's ResNet, with its stem and stages narrowed when the spec asks for it (same layer
    names, so the state-dict layout is the same as a full-width ResNet's)."""
    make = {18: resnet18, 50: resnet50}[spec.resnet_depth]
    body = make(weights=None, norm_layer=FrozenBatchNorm2d if spec.frozen_body_norm else nn.BatchNorm2d)
    if spec.resnet_width != 64:
        width, norm = spec.resnet_width, body._norm_layer
        block = type(body.layer1[0])
        body.inplanes = width
        body.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        body.bn1 = norm(width)
        for k in range(1, 5):
            stage = body._make_layer(block, width * 2 ** (k - 1), len(getattr(body, f"layer{k}")), stride=1 if k == 1 else 2)
            setattr(body, f"layer{k}", stage)
        body.fc = nn.Linear(body.inplanes, 1)  # unused by detection; dropped by the FPN wrapper
        for module in body.modules():  # ResNet's own initialization
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return body


def build_backbone(spec: ArchSpec) -> BackboneWithFPN:
    """ResNet body + FPN with a max-pool level, normalized as torchvision's trained models are."""
    body = build_body(spec)
    stage2 = body.inplanes // 8
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
        in_channels_list=[stage2 * 2 ** (k - 1) for k in range(1, 5)],
        out_channels=spec.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d if spec.batchnorm_in_heads else None,
    )


def build_model(
    arch: str,
    num_classes: int,
    detection: DetectionSettings | None = None,
    rpn: RPNSettings | None = None,
) -> MaskRCNN:
    """Mask R-CNN of architecture `arch` with `num_classes` labels (background included)."""
    spec = ARCHS.get(arch)
    if spec is None:
        raise UsageError(f"unknown architecture '{arch}'; known: {', '.join(ARCHS)}")
    c = spec.fpn_channels
    norm = nn.BatchNorm2d if spec.batchnorm_in_heads else None
    anchors = AnchorGenerator(ANCHOR_SIZES, ASPECT_RATIOS)
    rpn_head = RPNHead(c, anchors.num_anchors_per_location, conv_depth=spec.rpn_conv_depth)
    if spec.box_head == "conv":
        box_head = FastRCNNConvFCHead((c, 7, 7), [c] * 4, [spec.representation_size], norm_layer=norm)
    else:
        box_head = TwoMLPHead(c * 7 * 7, spec.representation_size)
    roi_heads = RoIHeads(
        box_head=box_head,
        box_predictor=FastRCNNPredictor(spec.representation_size, num_classes),
        mask_head=MaskRCNNHeads(c, [spec.mask_channels] * 4, 1, norm_layer=norm),
        mask_predictor=MaskRCNNPredictor(spec.mask_channels, spec.mask_channels, num_classes),
        settings=detection or DetectionSettings(),
    )
    return MaskRCNN(
        backbone=build_backbone(spec),
        rpn=RegionProposalNetwork(rpn_head, anchors, rpn or RPNSettings()),
        roi_heads=roi_heads,
        resize=ResizePolicy(spec.min_size, spec.max_size),
    )


def resize_policy(checkpoint: Checkpoint) -> ResizePolicy | None:
    """The input size a checkpoint was trained for (`segcli train --min-size/--max-size`), if recorded."""
    size = checkpoint.meta.get("input_size")
    if isinstance(size, dict) and isinstance(size.get("min_size"), int) and isinstance(size.get("max_size"), int):
        return ResizePolicy(size["min_size"], size["max_size"])
    return None


def model_from_checkpoint(checkpoint: Checkpoint, detection: DetectionSettings | None = None) -> MaskRCNN:
    """Build the checkpoint's architecture and load its weights; a mismatch is a WeightsError."""
    model = build_model(checkpoint.arch, len(checkpoint.label_to_category_id), detection)
    model.resize = resize_policy(checkpoint) or model.resize
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise WeightsError(
            f"{checkpoint.source or 'the checkpoint'} does not fit architecture {checkpoint.arch} "
            f"(pass the right --arch?): {detail[:300]}"
        ) from None
    return model.eval()
