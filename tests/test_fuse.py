"""BatchNorm folding changes float rounding only: the folded model detects the same things."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.ops import FrozenBatchNorm2d

from segcli.model.build import build_model
from segcli.model.fuse import fold_batchnorm
from segcli.model.parity import compare_detections
from tests.conftest import COCO_TINY_VAL, require


def test_every_batchnorm_is_folded_in_each_architecture():
    for arch, expected in [("maskrcnn_resnet50_fpn", 53), ("maskrcnn_resnet50_fpn_v2", 69), ("maskrcnn_resnet18_fpn_small", 20)]:
        model = build_model(arch, 5).eval()
        assert fold_batchnorm(model) == expected
        assert not any(isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())


def test_folded_model_gives_the_same_detections():
    torch.manual_seed(0)
    plain = build_model("maskrcnn_resnet50_fpn_v2", 91).eval()  # BatchNorm in body, FPN and heads
    state = plain.state_dict()
    state["roi_heads.box_predictor.cls_score.weight"] *= 0.5
    plain.load_state_dict(state)
    for module in plain.modules():  # give the BatchNorms non-trivial statistics to fold
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    folded = build_model("maskrcnn_resnet50_fpn_v2", 91).eval()
    folded.load_state_dict(plain.state_dict())
    fold_batchnorm(folded)
    image = np.asarray(Image.open(sorted(require(COCO_TINY_VAL).glob("*.jpg"))[0]).convert("RGB"))
    batch = torch.from_numpy(image.copy())[None]
    a = plain(batch, [image.shape[:2]])
    b = folded(batch, [image.shape[:2]])
    assert len(a.boxes) > 20
    report = compare_detections(a.boxes, a.scores, a.labels, a.paste_masks(0), b.boxes, b.scores, b.labels, b.paste_masks(0))
    assert report.fraction >= 0.98, report
