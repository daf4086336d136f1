"""Fold inference-mode BatchNorm into the convolution before it.

A frozen BatchNorm is a per-channel scale and shift, so conv -> BN equals one conv with scaled
weights and a bias. Folding removes one full pass over every feature map per BatchNorm (about a
tenth of the CPU time of ResNet-50 in bf16). Only for inference: the module structure changes,
so a folded model's state dict no longer matches checkpoints.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import FrozenBatchNorm2d

NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> bool:
    conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(norm, NORMS):
        return False
    if isinstance(norm, FrozenBatchNorm2d):
        norm = _as_batchnorm(norm)
    setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), norm.eval()))
    setattr(parent, norm_name, nn.Identity())
    return True


def _as_batchnorm(frozen: FrozenBatchNorm2d) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(frozen.weight.shape[0], eps=frozen.eps).to(frozen.weight.device)
    norm.weight.data.copy_(frozen.weight)
    norm.bias.data.copy_(frozen.bias)
    norm.running_mean.copy_(frozen.running_mean)
    norm.running_var.copy_(frozen.running_var)
    return norm


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every conv -> BatchNorm pair in place; returns how many were folded.

    Covers the layouts torchvision uses: ResNet blocks (conv1/bn1, conv2/bn2, conv3/bn3), the
    stem, downsample Sequentials and Conv2dNormActivation Sequentials (FPN and heads of v2).
    """
    folded = 0
    for module in list(model.modules()):
        for index in range(1, 4):
            folded += _fold_pair(module, f"conv{index}", f"bn{index}")
        if isinstance(module, nn.Sequential):
            names = [name for name, _ in module.named_children()]
            for conv_name, norm_name in zip(names, names[1:]):
                folded += _fold_pair(module, conv_name, norm_name)
    return folded
