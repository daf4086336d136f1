"""CPU inference: every convolution and linear layer with its ReLU (and a ResNet block's residual
add) as one oneDNN primitive, with weights stored in the precision they run in.

Run eagerly, a ResNet-50-FPN spends as much time outside its convolutions as in them on a CPU:
each ReLU and residual add is a pass over a feature map, and bfloat16 element-wise passes are
slower than float32 ones (they convert to float and back); autocast also casts every weight to
bfloat16 on every call. oneDNN applies a ReLU or an add to a convolution's output while it is
still in registers ("post-ops"), which is what inductor's CPU fusion emits too; this module calls
the same operators (`torch.ops.mkldnn._convolution_pointwise`, `_linear_pointwise`) eagerly, so
nothing is compiled and start-up stays as it was.

Numerics: float32 stays float32 (the same convolutions, the ReLU taken before the result is
stored). In bfloat16 a fused residual add is one rounding less than the eager add of two rounded
maps. The layers whose outputs are read as float32 (RPN objectness and deltas, box classifier
and regressor, mask logits) are left alone: they keep their float32 weights.

Only for inference on the CPU, after `fold_batchnorm`: the module tree changes, so a fused
model's state dict no longer matches checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

FUSABLE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fusion_available() -> bool:
    """oneDNN's fused operators exist in this torch build (x86 and most ARM wheels)."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_convolution_pointwise")
            and hasattr(mkldnn, "_linear_pointwise"))


class FusedConv2d(nn.Module):
    """`conv` (then ReLU when `relu`), optionally adding `residual` before the ReLU, in one call."""

    def __init__(self, conv: nn.Conv2d, relu: bool, dtype: torch.dtype) -> None:
        super().__init__()
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("only zero-padded convolutions with explicit padding can be fused")
        self.register_buffer("weight", conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype))
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.unary = "relu" if relu else "none"

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x = x.to(self.weight.dtype)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.geometry, self.unary, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual.to(x.dtype), self.weight, self.bias, *self.geometry, "add", 1.0,
            None if self.unary == "none" else self.unary, [], "")


class FusedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, relu: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(dtype).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.unary = "relu" if relu else "none"

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), self.weight, self.bias, self.unary, [], "")


class FusedResidualBlock(nn.Module):
    """torchvision's ResNet Bottleneck or BasicBlock (BatchNorm folded): its convolutions fused
    with their ReLUs, the last one also adding the shortcut before the block's ReLU."""

    def __init__(self, block: Bottleneck | BasicBlock, dtype: torch.dtype) -> None:
        super().__init__()
        names = ("conv1", "conv2", "conv3") if isinstance(block, Bottleneck) else ("conv1", "conv2")
        self.convs = nn.ModuleList(FusedConv2d(getattr(block, name), True, dtype) for name in names)
        self.downsample = _fused_shortcut(block.downsample, dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.convs[0].weight.dtype)
        shortcut = x if self.downsample is None else self.downsample(x)
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1](x, residual=shortcut)


def _fused_shortcut(downsample: nn.Module | None, dtype: torch.dtype) -> FusedConv2d | None:
    if downsample is None:
        return None
    convs = [m for m in downsample if not isinstance(m, nn.Identity)]
    if len(convs) != 1 or not isinstance(convs[0], nn.Conv2d):
        raise ValueError("a ResNet shortcut must be one convolution (BatchNorm folded)")
    return FusedConv2d(convs[0], False, dtype)


class FusedFPN(nn.Module):
    """torchvision's FeaturePyramidNetwork with a max-pool level: each lateral 1x1 conv adds the
    upsampled coarser level in the same primitive."""

    def __init__(self, fpn: FeaturePyramidNetwork, dtype: torch.dtype) -> None:
        super().__init__()
        if not isinstance(fpn.extra_blocks, LastLevelMaxPool):
            raise ValueError("only FPNs with a max-pool level can be fused")
        self.inner_blocks = nn.ModuleList(FusedConv2d(_only_conv(b), False, dtype) for b in fpn.inner_blocks)
        self.layer_blocks = nn.ModuleList(FusedConv2d(_only_conv(b), False, dtype) for b in fpn.layer_blocks)

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names, levels = list(x.keys()), list(x.values())
        last_inner = self.inner_blocks[-1](levels[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(levels) - 2, -1, -1):
            top_down = F.interpolate(last_inner, size=levels[idx].shape[-2:], mode="nearest")
            last_inner = self.inner_blocks[idx](levels[idx], residual=top_down)
            results.insert(0, self.layer_blocks[idx](last_inner))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return dict(zip(names + ["pool"], results))


def _only_conv(block: nn.Module) -> nn.Conv2d:
    """The convolution of an FPN block: a Conv2d, or a Conv2dNormActivation without activation."""
    if isinstance(block, nn.Conv2d):
        return block
    layers = [m for m in block if not isinstance(m, nn.Identity)]
    if len(layers) != 1 or not isinstance(layers[0], nn.Conv2d):
        raise ValueError(f"cannot fuse FPN block {block}")
    return layers[0]


class FusedRPNHead(nn.Module):
    """torchvision's RPNHead: the fused 3x3 conv(s) in the model's dtype, then objectness and box
    deltas from one float32 matrix product over the hidden map's pixels (the two 1x1 convolutions
    side by side), converted to float32 a block of rows at a time so the float32 copy of the
    largest level never exists whole. Outputs as `RegionProposalNetwork.head_outputs` gives them."""

    ROWS = 8192

    def __init__(self, head: RPNHead, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv = head.conv
        fuse_sequences(self.conv, dtype)
        self.num_anchors = head.cls_logits.out_channels
        weight = torch.cat([head.cls_logits.weight, head.bbox_pred.weight]).detach().flatten(1).float()
        self.register_buffer("weight", weight.t().contiguous())  # [C, A + 4A]
        self.register_buffer("bias", torch.cat([head.cls_logits.bias, head.bbox_pred.bias]).detach().float())

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        objectness, deltas = [], []
        for feature in features:
            hidden = self.conv(feature)
            batch, channels, height, width = hidden.shape
            pixels = hidden.permute(0, 2, 3, 1).reshape(-1, channels)  # a view for channels-last maps
            out = torch.empty((pixels.shape[0], self.weight.shape[1]), dtype=torch.float32, device=hidden.device)
            for start in range(0, pixels.shape[0], self.ROWS):
                rows = slice(start, start + self.ROWS)
                torch.addmm(self.bias, pixels[rows].float(), self.weight, out=out[rows])
            out = out.view(batch, height, width, -1).permute(0, 3, 1, 2)  # [B, A + 4A, H, W] views
            objectness.append(out[:, :self.num_anchors])
            deltas.append(out[:, self.num_anchors:])
        return objectness, deltas


class FusedTwoMLPHead(nn.Module):
    """torchvision's TwoMLPHead reading RoIAlign's channels-last [R, C, 7, 7] output as rows of
    (y, x, channel) values, its first layer's columns permuted to match: no transposing copy of
    the 1000 pooled proposals per image."""

    def __init__(self, head: TwoMLPHead, channels: int, dtype: torch.dtype) -> None:
        super().__init__()
        fc6 = head.fc6
        size = round((fc6.in_features // channels) ** 0.5)
        by_pixel = fc6.weight.detach().view(fc6.out_features, channels, size, size).permute(0, 2, 3, 1)
        permuted = nn.Linear(fc6.in_features, fc6.out_features)
        permuted.weight.data = by_pixel.reshape(fc6.out_features, -1)
        permuted.bias.data = fc6.bias.detach()
        self.fc6 = FusedLinear(permuted, True, dtype)
        self.fc7 = FusedLinear(head.fc7, True, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc7(self.fc6(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)))


def fuse_sequences(root: nn.Module, dtype: torch.dtype) -> int:
    """`fuse_sequential` on every Sequential in `root`, itself included."""
    return sum(fuse_sequential(m, dtype) for m in list(root.modules()) if isinstance(m, nn.Sequential))


def fuse_sequential(sequence: nn.Sequential, dtype: torch.dtype) -> int:
    """Fuse each Conv2d or Linear of `sequence` with the ReLU after it (Identity between them is
    skipped: a folded BatchNorm), in place; returns the number of layers fused."""
    children = list(sequence.named_children())
    fused = 0
    for position, (name, layer) in enumerate(children):
        if type(layer) not in (nn.Conv2d, nn.Linear):  # exactly these: not ConvTranspose2d, not fused ones
            continue
        following = [(n, m) for n, m in children[position + 1:] if not isinstance(m, nn.Identity)][:1]
        relu = bool(following) and isinstance(following[0][1], nn.ReLU)
        make = FusedConv2d if isinstance(layer, nn.Conv2d) else FusedLinear
        setattr(sequence, name, make(layer, relu, dtype))
        if relu:
            setattr(sequence, following[0][0], nn.Identity())
        fused += 1
    return fused


def fuse_for_cpu(model: nn.Module, precision: str) -> int:
    """Replace the backbone, FPN, RPN conv, box head and mask head of a BatchNorm-folded MaskRCNN
    with fused layers in `precision`'s dtype; the float32 output layers are kept. Returns the
    number of layers fused."""
    dtype = FUSABLE_PRECISIONS[precision]
    body = model.backbone.body
    fused = 0
    for stage in (body.layer1, body.layer2, body.layer3, body.layer4):
        for index, block in enumerate(stage):
            stage[index] = FusedResidualBlock(block, dtype)
            fused += len(stage[index].convs) + (block.downsample is not None)
    # The stem, which IntermediateLayerGetter runs in order: conv1, bn1 (folded), relu, maxpool.
    body.conv1 = FusedConv2d(body.conv1, True, dtype)
    body.relu = nn.Identity()
    model.backbone.fpn = FusedFPN(model.backbone.fpn, dtype)
    fused += 1 + 2 * len(model.backbone.fpn.inner_blocks)
    model.rpn.head = FusedRPNHead(model.rpn.head, dtype)
    fused += len(model.rpn.head.conv) + 1
    heads = model.roi_heads
    if isinstance(heads.box_head, TwoMLPHead):
        heads.box_head = FusedTwoMLPHead(heads.box_head, model.backbone.out_channels, dtype)
        fused += 2
    else:
        fused += fuse_sequences(heads.box_head, dtype)
    fused += fuse_sequences(heads.mask_head, dtype)
    # RoIAlign pools straight into the heads' dtype (one rounding of float32 sums, as the cast
    # before the first bfloat16 layer did).
    model.pool_dtype = dtype
    return fused
