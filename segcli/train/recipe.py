"""The training recipe's pieces: the initial model (fine-tuning reuses what fits), train mode,
the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from segcli.errors import UsageError, WeightsError
from segcli.data.coco import CocoDataset
from segcli.model.build import build_model
from segcli.model.maskrcnn import MaskRCNN
from segcli.train.options import DEFAULT_ARCH, TrainOptions
from segcli.weights import resolve_weights

# Layers whose shape or meaning depends on the categories: re-initialized when fine-tuning on others.
CLASS_SPECIFIC_PREFIXES = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)


def same_categories(a: list[dict], b: list[dict]) -> bool:
    return [(c["id"], c["name"]) for c in a] == [(c["id"], c["name"]) for c in b]


def init_class_layers(model: MaskRCNN) -> None:
    """Detectron's initialization of the class-specific output layers: small weights, so that the
    first iterations start from uniform class scores, near-zero box deltas and 0.5 mask
    probabilities. (torchvision's kaiming-initialized mask logits start the mask loss near 3 and
    destabilize training from scratch.)"""
    heads = model.roi_heads
    for layer, std in ((heads.box_predictor.cls_score, 0.01), (heads.box_predictor.bbox_pred, 0.001),
                       (heads.mask_predictor.mask_fcn_logits, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


def initial_model(options: TrainOptions, dataset: CocoDataset) -> tuple[MaskRCNN, str, str]:
    """(model, arch, how it was initialized). From --weights, the category-independent layers are
    reused and the class-specific ones re-initialized unless the categories are the same."""
    if options.weights is None:
        arch = options.arch or DEFAULT_ARCH
        model = build_model(arch, dataset.num_classes)
        init_class_layers(model)
        return model, arch, "random initialization"
    checkpoint = resolve_weights(options.weights, options.arch, progress=False)
    if options.arch is not None and options.arch != checkpoint.arch:
        raise UsageError(f"--weights {options.weights} is a {checkpoint.arch} checkpoint, not --arch {options.arch}")
    model = build_model(checkpoint.arch, dataset.num_classes)
    init_class_layers(model)
    keep_classes = same_categories(checkpoint.categories, dataset.categories) and \
        list(checkpoint.label_to_category_id) == dataset.label_to_category_id
    state = {k: v for k, v in checkpoint.state_dict.items()
             if keep_classes or not k.startswith(CLASS_SPECIFIC_PREFIXES)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"--weights {options.weights} does not fit {checkpoint.arch}: "
                           f"{str(exc).splitlines()[-1].strip()[:300]}") from None
    structural = [k for k in missing if not k.startswith(CLASS_SPECIFIC_PREFIXES)]
    if structural or unexpected:
        raise WeightsError(f"--weights {options.weights} does not fit {checkpoint.arch}: "
                           f"missing {structural[:3]}, unexpected {unexpected[:3]}")
    how = f"{options.weights}" + ("" if keep_classes else " (class-specific layers re-initialized)")
    return model, checkpoint.arch, how


# detectron2's ResNet stages, in the order FREEZE_AT counts them: the stem, then res2..res5.
RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def frozen_stages(model: MaskRCNN, freeze_at: int) -> list[nn.Module]:
    """The modules --freeze-at N freezes: the stem (N >= 1) and the first N - 1 ResNet stages."""
    body = model.backbone.body
    return [getattr(body, name) for names in RESNET_STAGES[:freeze_at] for name in names]


def freeze_stages(model: MaskRCNN, freeze_at: int) -> int:
    """No gradients for the frozen stages (so no backward through them and no optimizer state);
    their BatchNorms keep their statistics (set_train_mode). Returns the parameters frozen."""
    count = 0
    for module in frozen_stages(model, freeze_at):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
            count += parameter.numel()
    return count


def set_train_mode(model: nn.Module, freeze_bn: bool, freeze_at: int = 0) -> None:
    """Train mode, except that BatchNorm keeps its statistics when fine-tuning (batches of a few
    images would replace well-estimated statistics with noisy ones) and in frozen stages."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    for stage in frozen_stages(model, freeze_at):
        stage.eval()


def lr_factor(iteration: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at an iteration: linear warmup from 0.001, then decay."""
    if iteration < warmup:
        alpha = iteration / max(1, warmup)
        return 0.001 * (1 - alpha) + alpha
    if schedule == "cosine":
        progress = (iteration - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 0.1 ** sum(iteration >= m for m in (int(total * 2 / 3), int(total * 8 / 9)))


def make_optimizer(model: nn.Module, options: TrainOptions, world_size: int) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if options.optimizer == "adamw":
        lr = options.lr or 1e-4
        wd = 0.05 if options.weight_decay is None else options.weight_decay
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    lr = options.lr or 0.02 * options.batch_size * world_size / 16  # the linear scaling rule
    wd = 1e-4 if options.weight_decay is None else options.weight_decay
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
