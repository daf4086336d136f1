"""CPU fusion (segcli.model.cpu_fusion): every convolution and linear layer of the backbone, FPN,
RPN and heads runs with its ReLU and residual add in one oneDNN call, and that changes nothing
but float rounding in fp32 (the torchvision parity of the fused predict path is in test_parity.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from segcli.data.images import read_image
from segcli.device import fuses_on, prepare_for_inference
from segcli.model import cpu_fusion
from segcli.model.build import build_model
from segcli.model.cpu_fusion import FusedConv2d, FusedLinear, FusedTwoMLPHead, fusion_available
from segcli.model.parity import compare_detections
from segcli.model.roi_heads import DetectionSettings
from segcli.ops.roi_align import RoIPyramid
from tests.conftest import COCO_TINY_VAL, require

pytestmark = pytest.mark.skipif(not fusion_available(), reason="this torch build has no oneDNN fused operators")
CPU = torch.device("cpu")
ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet18_fpn_small", "maskrcnn_resnet18_fpn_tiny")


def seeded_model(arch: str, num_classes: int = 91, seed: int = 0, threshold: float = 0.3):
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, DetectionSettings(score_threshold=threshold)).eval()
    with torch.no_grad():  # scores that spread over the thresholds (random heads all score ~1/91)
        model.roi_heads.box_predictor.cls_score.weight *= 4.0
        model.roi_heads.mask_predictor.mask_fcn_logits.weight *= 0.5
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_layer_is_fused_and_the_output_layers_stay_float32(arch, precision):
    model = prepare_for_inference(seeded_model(arch, 5), CPU, precision, fuse=True)
    fused_parts = (model.backbone, model.rpn.head, model.roi_heads.box_head, model.roi_heads.mask_head)
    for part in fused_parts:
        plain = [m for m in part.modules() if type(m) in (nn.Conv2d, nn.Linear, nn.ReLU)]
        assert not plain, f"{arch}: left unfused: {plain[:3]}"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    fused = [m for part in fused_parts for m in part.modules() if isinstance(m, (FusedConv2d, FusedLinear))]
    assert fused and all(m.weight.dtype == dtype for m in fused)
    heads = model.roi_heads
    for layer in (heads.box_predictor.cls_score, heads.box_predictor.bbox_pred, heads.mask_predictor.mask_fcn_logits):
        assert layer.weight.dtype == torch.float32
    assert model.rpn.head.weight.dtype == torch.float32  # objectness and box deltas
    assert model.is_channels_last


def test_fusion_is_for_cpus_in_fp32_and_bf16_only():
    assert fuses_on(CPU, "fp32") and fuses_on(CPU, "bf16")
    assert not fuses_on(CPU, "fp16")
    assert not fuses_on(torch.device("cuda"), "bf16")  # the CUDA path keeps cuDNN and Triton
    model = prepare_for_inference(seeded_model("maskrcnn_resnet18_fpn_tiny", 5), CPU, "fp32")  # export's call
    assert not any(isinstance(m, FusedConv2d) for m in model.modules())


def test_without_onednn_fusion_the_model_runs_unfused(monkeypatch):
    monkeypatch.setattr("segcli.device.fusion_available", lambda: False)
    model = prepare_for_inference(seeded_model("maskrcnn_resnet18_fpn_tiny", 5), CPU, "bf16", fuse=True)
    assert not any(isinstance(m, FusedConv2d) for m in model.modules())
    image = torch.zeros((1, 96, 128, 3), dtype=torch.uint8)
    assert model(image, [(96, 128)]).boxes.shape[1] == 4


@pytest.mark.parametrize("arch", ["maskrcnn_resnet18_fpn_small", "maskrcnn_resnet18_fpn_tiny"])
def test_fused_fp32_model_detects_what_the_unfused_one_does(arch):
    """ResNet-18's BasicBlock path (the ResNet-50 Bottleneck path is compared with torchvision in
    test_parity.py), on real photos."""
    reference = seeded_model(arch, threshold=0.1)
    fused = prepare_for_inference(copy.deepcopy(reference), CPU, "fp32", fuse=True)
    matched = total = 0
    for path in sorted(require(COCO_TINY_VAL).glob("*.jpg"))[:3]:
        image = read_image(path)
        batch, sizes = torch.from_numpy(image)[None], [image.shape[:2]]
        a, b = reference(batch, sizes), fused(batch, sizes)
        report = compare_detections(a.boxes, a.scores, a.labels, a.paste_masks(0), b.boxes, b.scores, b.labels, b.paste_masks(0))
        matched, total = matched + report.matched, total + max(report.reference_count, report.candidate_count)
    assert total > 20, "too few detections to compare"
    assert matched / total >= 0.98, f"{matched}/{total}"


def test_fused_rpn_head_gives_the_two_convolutions_outputs():
    model = seeded_model("maskrcnn_resnet18_fpn_small")
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 128, 40 // 2**k, 56 // 2**k, generator=g) for k in range(5)]
    with torch.inference_mode():
        expected = model.rpn.head_outputs(features)
        head = cpu_fusion.FusedRPNHead(copy.deepcopy(model.rpn.head), torch.float32)
        head.ROWS = 100  # several row blocks on the largest level
        model.rpn.head = head
        got = model.rpn.head_outputs([f.contiguous(memory_format=torch.channels_last) for f in features])
    for want, have in zip(expected[0] + expected[1], got[0] + got[1]):
        assert want.shape == have.shape and have.dtype == torch.float32
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4)


def test_fused_two_mlp_head_reads_channels_last_pooled_features():
    torch.manual_seed(0)
    head = TwoMLPHead(16 * 49, 32).eval()
    pooled = torch.randn(10, 7, 7, 16).permute(0, 3, 1, 2)  # what RoIPyramid returns at inference
    with torch.inference_mode():
        expected = head(pooled.contiguous())
        got = FusedTwoMLPHead(head, 16, torch.float32)(pooled)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_roi_pyramid_pools_bf16_features_into_bf16_with_one_rounding():
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(1, 32, 64 // 2**k, 80 // 2**k, generator=g).bfloat16() for k in range(4)]
    boxes = torch.tensor([[3.0, 5.0, 60.0, 50.0], [100.0, 80.0, 300.0, 250.0], [0.0, 0.0, 320.0, 256.0]])
    index = torch.zeros(3, dtype=torch.int64)
    expected = RoIPyramid(features, (256, 320))(boxes, index, 7, 2)  # float32 sums of the bf16 values
    got = RoIPyramid(features, (256, 320), torch.bfloat16)(boxes, index, 7, 2)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    # bf16 keeps 8 bits: the rounded sum (2**-9 relative) plus the rounded bilinear weights.
    assert ((got.float() - expected).abs() <= 2**-7 * expected.abs().clamp(min=1.0)).all()


def test_bf16_fused_model_stays_close_to_fp32():
    """bf16 moves scores and boxes a little (its accuracy against ground truth is measured by
    benchmarks/precision_accuracy.py); here it must find nearly the same objects as fp32."""
    from torchvision.ops import box_iou

    from segcli.device import cpu_has_fast_bf16

    if not cpu_has_fast_bf16():  # emulated bf16 (AVX2 only) rounds differently; auto picks fp32 there
        pytest.skip("this CPU has no AVX-512 BF16 or AMX: segcli does not run bf16 on it")

    model = seeded_model("maskrcnn_resnet18_fpn_tiny", threshold=0.1)
    fp32 = prepare_for_inference(copy.deepcopy(model), CPU, "fp32", fuse=True)
    bf16 = prepare_for_inference(copy.deepcopy(model), CPU, "bf16", fuse=True)
    image = read_image(sorted(require(COCO_TINY_VAL).glob("*.jpg"))[0])
    batch, sizes = torch.from_numpy(image)[None], [image.shape[:2]]
    a, b = fp32(batch, sizes), bf16(batch, sizes)
    assert len(a.boxes) > 20
    found = [bool(((box_iou(a.boxes[i:i + 1], b.boxes)[0] > 0.8) & (b.labels == a.labels[i])).any()) for i in range(len(a.boxes))]
    assert np.mean(found) >= 0.8, np.mean(found)
