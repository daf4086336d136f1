"""Shared by the benchmarks: real photos, torchvision twins of segcli's architectures, seeded weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

ROOT = Path(__file__).resolve().parents[1]
COCO_TINY = ROOT.parent / "shared" / "data" / "coco_tiny" / "images"

CLASSIFIER_KEY = "roi_heads.box_predictor.cls_score.weight"
BOX_DELTAS_KEYS = ("rpn.head.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.weight")
# Random box-regression layers (RPN and box head) move boxes by exp(large) and leave sub-pixel slivers; a trained one
# refines its proposals by a few percent. Scaling it down gives boxes of a trained model's shapes.
BOX_DELTAS_SCALE = 0.01


def real_photos(count: int) -> list[Path]:
    photos = sorted(COCO_TINY.glob("val2017/*.jpg")) + sorted(COCO_TINY.glob("train2017/*.jpg"))
    if not photos:
        raise SystemExit(f"no photos under {COCO_TINY}; ../shared/data must be beside the project")
    return photos[:count]


def torchvision_model(arch: str, num_classes: int = 91) -> MaskRCNN:
    """torchvision's own Mask R-CNN with the state-dict layout of segcli's `arch`."""
    if arch == "maskrcnn_resnet50_fpn":  # as torchvision builds its trained model: frozen BatchNorm
        return MaskRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=num_classes)
    if arch == "maskrcnn_resnet50_fpn_v2":
        return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes)
    if arch in ("maskrcnn_resnet18_fpn_small", "maskrcnn_resnet18_fpn_tiny"):
        from segcli.archs import ARCHS
        from segcli.model.build import build_body

        spec = ARCHS[arch]
        body = build_body(spec)  # torchvision's ResNet-18 (BatchNorm trained; narrowed for tiny)
        width, c = spec.resnet_width, spec.fpn_channels
        backbone = BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                                   [width * 2**k for k in range(4)], c, extra_blocks=LastLevelMaxPool())
        return MaskRCNN(
            backbone, num_classes=None, min_size=spec.min_size, max_size=spec.max_size,
            rpn_head=RPNHead(c, 3), box_head=TwoMLPHead(c * 49, spec.representation_size),
            box_predictor=FastRCNNPredictor(spec.representation_size, num_classes),
            mask_head=MaskRCNNHeads(c, [spec.mask_channels] * 4, 1),
            mask_predictor=MaskRCNNPredictor(spec.mask_channels, spec.mask_channels, num_classes),
        )
    raise ValueError(arch)


def seeded_state_dict(arch: str, photos: list[Path], seed: int = 0, target: float = 10.0) -> dict[str, torch.Tensor]:
    """Seeded random weights whose classifier is scaled to a trained model's score spread on
    `photos`: about `target` detections per image above 0.5 (and the full hundred above 0.05).

    Random heads score everything alike (all near 1/91, or all near 1.0); the scale is found by
    bisection on its logarithm, using segcli's model on the first two photos.
    """
    import numpy as np
    from PIL import Image

    from segcli.device import prepare_for_inference, resolve_precision
    from segcli.model.build import build_model
    from segcli.model.roi_heads import DetectionSettings

    torch.manual_seed(seed)
    state = torchvision_model(arch).state_dict()
    for key in BOX_DELTAS_KEYS:
        state[key] *= BOX_DELTAS_SCALE
    base = state[CLASSIFIER_KEY].clone()
    model = build_model(arch, base.shape[0], DetectionSettings(score_threshold=0.5))
    model.load_state_dict(state)
    cpu = torch.device("cpu")
    model = prepare_for_inference(model, cpu, resolve_precision("auto", cpu))
    classifier = model.roi_heads.box_predictor.cls_score.weight
    images = [np.array(Image.open(p).convert("RGB")) for p in photos[:2]]  # writable, for torch.from_numpy
    low, high = -4.0, 4.0  # log2 of the scale
    for _ in range(7):
        middle = (low + high) / 2
        with torch.no_grad():
            classifier.copy_(base * 2**middle)
        count = np.mean([len(model(torch.from_numpy(im)[None], [im.shape[:2]]).boxes) for im in images])
        low, high = (middle, high) if count < target else (low, middle)
    state[CLASSIFIER_KEY] = base * 2 ** ((low + high) / 2)
    return state
