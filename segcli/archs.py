"""The architectures segcli builds, described as data so that a checkpoint can name its own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    name: str
    resnet_depth: int  # 18 or 50
    fpn_channels: int
    rpn_conv_depth: int  # 1 (v1) or 2 (v2)
    box_head: str  # "mlp": two fully connected layers (v1); "conv": 4 convs + 1 fc (v2)
    representation_size: int
    mask_channels: int
    batchnorm_in_heads: bool  # v2 puts BatchNorm in the FPN and the heads
    frozen_body_norm: bool  # v1 trains its ResNet with frozen BatchNorm; v2 with ordinary BatchNorm
    min_size: int
    max_size: int
    resnet_width: int = 64  # channels of the ResNet stem; stages have 1x, 2x, 4x, 8x (x4 for ResNet-50)


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("maskrcnn_resnet50_fpn", 50, 256, 1, "mlp", 1024, 256, False, True, 800, 1333),
        ArchSpec("maskrcnn_resnet50_fpn_v2", 50, 256, 2, "conv", 1024, 256, True, False, 800, 1333),
        # Small and fast on a CPU: for tests and CPU users. ResNet-18, narrow FPN and heads. Its body
        # trains with ordinary BatchNorm, so it can be trained from scratch (no ImageNet weights offline).
        ArchSpec("maskrcnn_resnet18_fpn_small", 18, 128, 1, "mlp", 512, 128, False, False, 512, 853),
        # Tiny: a half-width ResNet-18 (4M parameters, 8 MB in half precision), for simple domains and
        # the demo checkpoint shipped in weights/.
        ArchSpec("maskrcnn_resnet18_fpn_tiny", 18, 64, 1, "mlp", 256, 64, False, False, 256, 427, resnet_width=32),
    )
}
