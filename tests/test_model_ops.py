"""The batched building blocks against the torchvision functions they replace."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align

from segcli.model.build import build_model
from segcli.model.preprocess import IMAGE_MEAN, IMAGE_STD, ResizePolicy, prepare_batch
from segcli.model.roi_heads import MASK_CHUNK, FlatDetections, bucketed_count, own_class_logits
from segcli.ops.paste_masks import paste_masks_transposed
from segcli.ops.roi_align import RoIPyramid, sample_masks, transposed_gather


def random_boxes(n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height])
    wh = torch.rand(n, 2, generator=g) * 90 + 0.3
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def test_paste_masks_equals_torchvision():
    g = torch.Generator().manual_seed(0)
    height, width = 123, 157
    masks = torch.rand(60, 28, 28, generator=g)
    boxes = random_boxes(60, height, width, g)
    boxes[0] = torch.tensor([0.0, 0.0, 3.0, 2.0])  # tiny, at the corner
    boxes[1] = torch.tensor([100.0, 100.0, 100.2, 100.1])  # sub-pixel
    boxes[2] = torch.tensor([0.0, 0.0, float(width), float(height)])  # whole image
    expected = paste_masks_in_image(masks[:, None], boxes, (height, width))[:, 0]
    probs = paste_masks_transposed(masks, boxes, height, width, threshold=None).transpose(1, 2)
    assert (probs - expected).abs().max() < 1e-5
    binary = paste_masks_transposed(masks, boxes, height, width).transpose(1, 2)
    assert binary.dtype == torch.bool
    assert torch.equal(binary, expected > 0.5)


def test_paste_masks_chunks_bound_memory(monkeypatch):
    import segcli.ops.paste_masks as module

    g = torch.Generator().manual_seed(1)
    masks, boxes = torch.rand(9, 28, 28, generator=g), random_boxes(9, 50, 60, g)
    whole = paste_masks_transposed(masks, boxes, 50, 60, threshold=None)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 50 * 60 * 2)  # two masks per chunk
    assert torch.equal(paste_masks_transposed(masks, boxes, 50, 60, threshold=None), whole)


def test_paste_masks_layout_is_fortran_ready():
    masks = paste_masks_transposed(torch.rand(3, 28, 28), torch.tensor([[1.0, 2.0, 30.0, 20.0]] * 3), 40, 50)
    array = masks.numpy().transpose(2, 1, 0)  # [H, W, N]
    assert array.shape == (40, 50, 3) and array.flags["F_CONTIGUOUS"]


def test_preprocess_matches_torchvision_transform_for_mixed_sizes():
    g = torch.Generator().manual_seed(0)
    sizes = [(480, 640), (427, 640), (300, 301)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    reference = GeneralizedRCNNTransform(800, 1333, list(IMAGE_MEAN), list(IMAGE_STD)).eval()
    expected, _ = reference([im.float() / 255 for im in images])
    batch = torch.zeros(3, 480, 640, 3, dtype=torch.uint8)
    for i, im in enumerate(images):
        batch[i, : im.shape[1], : im.shape[2]] = im.permute(1, 2, 0)
    prepared = prepare_batch(batch, sizes, ResizePolicy(800, 1333))
    assert prepared.resized_sizes == [tuple(s) for s in expected.image_sizes]
    assert prepared.tensor.shape == expected.tensors.shape
    # Two float32 matrix products sum in an order that depends on the BLAS blocking and thread count
    # (1e-5 with 2 threads, 1e-4 with 1): well below one uint8 grey level (1/255/0.225 = 0.017).
    assert (prepared.tensor - expected.tensors).abs().max() < 3e-4
    same = prepare_batch(batch[:1], sizes[:1], ResizePolicy(800, 1333))  # uniform sizes: exact
    assert torch.equal(same.tensor, expected.tensors[:1, :, :, : same.tensor.shape[-1]])


def test_multilevel_roi_align_equals_torchvision_multiscale():
    g = torch.Generator().manual_seed(0)
    padded = (256, 320)
    features = [torch.randn(2, 8, padded[0] // s, padded[1] // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = [random_boxes(40, 250, 300, g) * 2.5, random_boxes(30, 250, 300, g)]
    edge_cases = torch.tensor([
        [10.0, 10.0, 10.0, 10.0],  # a point
        [-50.0, -40.0, -5.0, -3.0],  # wholly outside, above-left
        [290.0, 240.0, 400.0, 300.0],  # past the bottom-right edge
        [0.0, 0.0, 320.0, 256.0],  # the whole padded input
        [100.0, 20.0, 100.4, 200.0],  # thinner than a pixel
    ])
    boxes[1][: len(edge_cases)] = edge_cases
    reference = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = reference({str(i): f for i, f in enumerate(features)}, boxes, [(250, 300), (240, 310)])
    flat = torch.cat(boxes)
    batch_index = torch.cat([torch.zeros(40, dtype=torch.int64), torch.ones(30, dtype=torch.int64)])
    pyramid = RoIPyramid(features, padded)
    got = pyramid(flat, batch_index, 7, 2)
    assert (got - expected).abs().max() < 1e-6
    bf16 = RoIPyramid([f.bfloat16() for f in features], padded)(flat, batch_index, 7, 2)  # as under autocast
    assert bf16.dtype == torch.float32 and (bf16 - expected).abs().max() < 0.05


def test_multilevel_roi_align_gradients_equal_torchvision_multiscale():
    """Training differentiates the gather path (a hand-written backward on the CPU): the
    features' gradients must be torchvision's RoIAlign backward's."""
    g = torch.Generator().manual_seed(1)
    padded = (128, 160)
    features = [torch.randn(2, 4, padded[0] // s, padded[1] // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = [random_boxes(25, 120, 150, g) * 1.5, random_boxes(20, 120, 150, g)]
    boxes[1][0] = torch.tensor([0.0, 0.0, 160.0, 128.0])
    flat = torch.cat(boxes)
    batch_index = torch.cat([torch.zeros(25, dtype=torch.int64), torch.ones(20, dtype=torch.int64)])
    upstream = torch.randn(len(flat), 4, 14, 14, generator=g)
    ours = [f.clone().requires_grad_() for f in features]
    theirs = [f.clone().requires_grad_() for f in features]
    (RoIPyramid(ours, padded)(flat, batch_index, 14, 2) * upstream).sum().backward()
    reference = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
    (reference({str(i): f for i, f in enumerate(theirs)}, boxes, [(120, 150), (120, 150)]) * upstream).sum().backward()
    for a, b in zip(ours, theirs):
        assert a.grad is not None and (a.grad - b.grad).abs().max() < 1e-4
    assert sum(float(a.grad.abs().sum()) for a in ours) > 1.0  # the boxes did read every level's pixels


def test_transposed_gather_equals_embedding_bags_own_gradient():
    g = torch.Generator().manual_seed(2)
    table = torch.randn(300, 8, generator=g, requires_grad=True)
    rows = torch.randint(0, 300, (500, 16), generator=g)
    rows[:, 5] = 7  # many taps on one row
    weights = torch.rand(500, 16, generator=g)
    upstream = torch.randn(500, 8, generator=g)
    torch.nn.functional.embedding_bag(rows, table, per_sample_weights=weights, mode="sum").backward(upstream)
    got = transposed_gather(upstream, rows, weights, 300)
    assert torch.allclose(got, table.grad, atol=1e-5, rtol=1e-5)
    assert got.shape == table.shape


def test_sample_masks_equals_torchvision_roi_align_aligned():
    """Training's mask targets: torchvision's aligned RoIAlign of the float masks, read from uint8."""
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(5, 60, 90, generator=g) > 0.6).to(torch.uint8)
    boxes = random_boxes(40, 60, 90, g)
    boxes[:6] = torch.tensor([
        [10.0, 10.0, 10.3, 10.2],  # smaller than a pixel: aligned RoIAlign does not widen it
        [-30.0, -20.0, -2.0, -1.0],  # outside
        [80.0, 50.0, 120.0, 90.0],  # past the bottom-right edge
        [0.0, 0.0, 90.0, 60.0],  # the whole mask
        [89.5, 59.5, 90.0, 60.0],  # the last pixel
        [5.0, 5.0, 5.0, 40.0],  # zero width
    ])
    index = torch.randint(0, 5, (40,), generator=g)
    expected = roi_align(masks[:, None].float(), torch.cat([index[:, None].float(), boxes], 1), (28, 28),
                         spatial_scale=1.0, sampling_ratio=2, aligned=True)[:, 0]
    got = sample_masks(masks, index, boxes, 28)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-5
    assert 0.1 < float((expected >= 0.5).float().mean()) < 0.9  # the masks are not blank


def test_bucketed_count_pads_little_and_to_few_sizes():
    counts = range(1, 2001)
    assert all(count <= bucketed_count(count) <= 1.25 * count for count in counts)
    assert len({bucketed_count(count) for count in range(1, 101)}) == 23  # not 100 shapes


@pytest.mark.parametrize("count", [9, 2 * MASK_CHUNK + 9])
def test_mask_stage_equals_the_mask_head_on_exactly_the_detections(count):
    """Neither the zero rows the mask stage adds for bucketing, nor running it in chunks of
    MASK_CHUNK detections, nor computing only each detection's own class changes a probability:
    the same as torchvision's way, the all-class mask predictor run once on exactly the detections."""
    torch.manual_seed(0)
    heads = build_model("maskrcnn_resnet18_fpn_tiny", 6).roi_heads.eval()
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 64, 64 // 2**level, 96 // 2**level, generator=g) for level in range(4)]
    pyramid = RoIPyramid(features, (256, 384))
    assert bucketed_count(count % MASK_CHUNK) > count % MASK_CHUNK  # the last chunk is padded
    detections = FlatDetections(boxes=random_boxes(count, 256, 384, g), scores=torch.rand(count, generator=g),
                                labels=torch.randint(1, 6, (count,), generator=g),
                                image_index=torch.randint(0, 2, (count,), generator=g))
    with torch.inference_mode():
        got = heads.mask_probabilities(pyramid, detections)
        pooled = pyramid(detections.boxes, detections.image_index, 14, 2)
        logits = heads.mask_predictor(heads.mask_head(pooled))
        expected = torch.sigmoid(logits[torch.arange(count), detections.labels])
    assert got.shape == (count, 28, 28)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mask_stage_blocks_do_not_grow_with_the_detection_count():
    """On the CPU the largest tensor the mask stage creates for 100 detections is the one it
    creates for MASK_CHUNK: memory blocks of the same few sizes every frame (what keeps glibc's
    heap from fragmenting on long videos), whatever the count."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.untyped_storage().nbytes())
            return out

    torch.manual_seed(0)
    heads = build_model("maskrcnn_resnet18_fpn_tiny", 6).roi_heads.eval()
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(1, 64, 64 // 2**level, 96 // 2**level, generator=g) for level in range(4)]
    pyramid = RoIPyramid(features, (256, 384))
    pyramid.table()  # built once per image for all of its detections, not by the mask stage

    def largest_block(count: int) -> int:
        detections = FlatDetections(boxes=random_boxes(count, 256, 384, g), scores=torch.rand(count, generator=g),
                                    labels=torch.randint(1, 6, (count,), generator=g),
                                    image_index=torch.zeros(count, dtype=torch.long))
        with torch.inference_mode(), LargestOutput() as mode:
            heads.mask_probabilities(pyramid, detections)
        return mode.largest

    assert largest_block(100) == largest_block(MASK_CHUNK) > largest_block(MASK_CHUNK // 2)


def test_own_class_logits_match_the_all_class_convolution_and_its_gradients():
    """Training's mask loss uses own_class_logits too: values and gradients (of the features, the
    weights and the bias) equal those of the full 1x1 convolution followed by picking each row's class."""
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Conv2d(16, 7, 1)
    hidden = torch.randn(5, 16, 28, 28, generator=g, requires_grad=True)
    labels = torch.tensor([1, 6, 1, 3, 0])
    target = torch.rand(5, 28, 28, generator=g)
    results = []
    for logits_of in (lambda: own_class_logits(layer, hidden, labels),
                      lambda: layer(hidden)[torch.arange(5), labels]):
        layer.zero_grad()
        hidden.grad = None
        logits = logits_of()
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
        results.append((logits.detach(), hidden.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
