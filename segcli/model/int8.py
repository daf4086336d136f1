"""CPU int8 inference inside segcli's own pipeline: the fused model's convolutions and linear
layers as oneDNN int8 primitives (u8 activations, per-channel s8 weights, int32 sums), called
eagerly as `segcli.model.cpu_fusion` calls the float ones: nothing is compiled.

Why not ONNX Runtime's int8 file (`segcli quantize --out x.onnx`): its convolutions are fast, but
its graph around them (RPN decoding, NMS, RoIAlign, per-image loops) is slower than segcli's, so
on a CPU with fast bf16 the whole int8 file lost to segcli's bf16 path. Here only the layers
change; everything else is the bf16 (or fp32) pipeline predict runs anyway.

How it is made (`observe` then `convert`, the usual post-training static recipe):
1. The model is fused in float32 (`fuse_for_cpu(model, "fp32")`, predict's fp32 path) and every
   fused layer records the range of what comes in and goes out over the calibration photos.
2. Each layer becomes an int8 one whose activation scales come from those ranges (min/max,
   asymmetric u8) and whose weights are rounded per output channel (symmetric s8).

Between int8 layers the activations stay u8 (`QMap`: the bytes and their scale and zero point),
so a ResNet block, an FPN lateral and its top-down add run without a float pass in between: the
residual or top-down map is added inside the convolution (oneDNN's "sum" post-op). Float maps
(bf16 on CPUs with fast bf16, else fp32) come out where float code reads them: the FPN outputs
(RoIAlign, the RPN's 1x1 layers), the last mask-head convolution (the transposed convolution
after it), the box head's second layer (the classifier). The stem convolution (3 input channels,
where int8 gains nothing) and every predictor layer stay float.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from segcli.model.cpu_fusion import FusedConv2d, FusedFPN, FusedLinear, FusedResidualBlock, FusedRPNHead, FusedTwoMLPHead

RANGE_KEYS = ("in_lo", "in_hi", "out_lo", "out_hi")
SCOPES = ("all", "backbone")


def int8_kernels_available() -> bool:
    """torch has oneDNN's int8 convolution and linear operators (x86 builds do)."""
    onednn = getattr(torch.ops, "onednn", None)
    try:
        return all(hasattr(onednn, name) for name in ("qconv_prepack", "qconv2d_pointwise", "qlinear_prepack", "qlinear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


@dataclass
class QMap:
    """A u8 activation: real value = (data - zero_point) * scale."""

    data: Tensor
    scale: float
    zero_point: int

    def dequantize(self) -> Tensor:
        return (self.data.float() - self.zero_point) * self.scale


def qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero_point) of an asymmetric u8 grid covering [lo, hi] and 0 (so zero padding is exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    if not scale > 0:  # a layer that never fired in calibration: any grid represents its zeros
        return 1.0, 0
    return scale, int(min(255, max(0, round(-lo / scale))))


def quantize(x: Tensor, scale: float, zero_point: int) -> QMap:
    """A float map onto the u8 grid (round to nearest even, clamp), in x's memory format."""
    with warnings.catch_warnings():
        # quantize_per_tensor is torch's vectorized kernel; the warning is about quantized dtypes
        # as a user API (we take the bytes out at once), not about the operator.
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8)
    return QMap(q.int_repr(), scale, zero_point)


class RangeObserver:
    """Running min and max of a layer's input and output over the calibration photos."""

    def __init__(self) -> None:
        self.values = [float("inf"), float("-inf"), float("inf"), float("-inf")]
        self.shape: list[int] | None = None

    def see(self, x: Tensor, out: Tensor) -> None:
        self.shape = self.shape or list(x.shape)
        v = self.values
        v[0], v[1] = min(v[0], float(x.min())), max(v[1], float(x.max()))
        v[2], v[3] = min(v[2], float(out.min())), max(v[3], float(out.max()))

    def as_dict(self) -> dict:
        return {**dict(zip(RANGE_KEYS, self.values)), "in_shape": self.shape}


def _observing_forward(layer: nn.Module, observer: RangeObserver):
    original = layer.forward

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        out = original(x, *args, **kwargs)
        observer.see(x, out)
        return out

    return forward


def observe(model: nn.Module) -> dict[str, RangeObserver]:
    """Attach a RangeObserver to every fused conv/linear of a float32-fused model (forward
    patched on the instance; `release` removes them). Keys are module paths."""
    observers = {}
    for name, layer in model.named_modules():
        if isinstance(layer, (FusedConv2d, FusedLinear)):
            observers[name] = RangeObserver()
            layer.forward = _observing_forward(layer, observers[name])
    return observers


def release(model: nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, (FusedConv2d, FusedLinear)) and "forward" in vars(layer):
            del layer.forward


def _weight_qparams(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric s8 weights and their scales."""
    flat = weight.detach().float().flatten(1)
    scales = (flat.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.clamp(torch.round(weight.detach().float() / scales.view(shape)), -127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


class _Int8Layer(nn.Module):
    """What an int8 conv and linear share: the u8 grids of input and output (from the observed
    ranges; a float output has none), the s8 weights per output channel, the float32 bias."""

    def __init__(self, fused: FusedConv2d | FusedLinear, ranges: dict[str, float], out: str | torch.dtype) -> None:
        super().__init__()
        self.unary = fused.unary
        self.in_scale, self.in_zero_point = qparams(ranges["in_lo"], ranges["in_hi"])
        self.out = out
        self.out_scale, self.out_zero_point = qparams(ranges["out_lo"], ranges["out_hi"]) if out == "u8" else (1.0, 0)
        self.int8_weight, self.w_scales = _weight_qparams(fused.weight)  # prepacked by the subclass
        self.w_zero_points = torch.zeros(self.int8_weight.shape[0], dtype=torch.int64)
        self.bias = None if fused.bias is None else fused.bias.detach().float()

    memory_format = torch.contiguous_format  # of a float input quantized here

    def _input(self, x: Tensor | QMap) -> QMap:
        """x on this layer's input grid: a QMap on it as is, anything else (re)quantized. Producer
        and consumer are built from the same observed range, so requantizing is a safety net."""
        if isinstance(x, QMap) and (x.scale, x.zero_point) == (self.in_scale, self.in_zero_point):
            return x
        if isinstance(x, QMap):
            x = x.dequantize()
        return quantize(x.contiguous(memory_format=self.memory_format), self.in_scale, self.in_zero_point)

    def _output(self, y: Tensor) -> Tensor | QMap:
        return QMap(y, self.out_scale, self.out_zero_point) if self.out == "u8" else y


class Int8Conv2d(_Int8Layer):
    """A FusedConv2d (BatchNorm folded, optional ReLU, optional residual sum) in int8.

    `out` is "u8" (a QMap on the observed output range) or a float dtype. Input: a QMap, or a float
    map quantized on the observed input range."""

    def __init__(self, fused: FusedConv2d, ranges: dict[str, float], out: str | torch.dtype) -> None:
        super().__init__(fused, ranges, out)
        padding, stride, dilation, groups = fused.geometry
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        # Prepacked for an input shape seen in calibration: without one, oneDNN picks a weight
        # layout that the kernel it chooses at run time may not read, and then reorders the
        # weights on every call (measured: 60 ms a call for layer4's 1x1 shortcut, against 5 ms
        # for the convolution itself). Any real feature-map shape gives the kernel's layout.
        self.weight = torch.ops.onednn.qconv_prepack(self.int8_weight, self.w_scales, self.in_scale, self.in_zero_point,
                                                     stride, padding, dilation, groups, ranges.get("in_shape"))
        del self.int8_weight

    memory_format = torch.channels_last

    def forward(self, x: Tensor | QMap, residual: Tensor | QMap | None = None) -> Tensor | QMap:
        q = self._input(x)
        out_dtype = None if self.out == "u8" else self.out
        if residual is None:
            y = torch.ops.onednn.qconv2d_pointwise(
                q.data, q.scale, q.zero_point, self.weight, self.w_scales, self.w_zero_points, self.bias,
                self.stride, self.padding, self.dilation, self.groups, self.out_scale, self.out_zero_point,
                out_dtype, self.unary, [], "")
            return self._output(y)
        # The sum post-op accumulates into `residual`'s buffer: callers pass a map nothing reads later.
        if self.out == "u8":
            if not isinstance(residual, QMap):
                raise TypeError("a u8 residual sum needs a u8 residual")
            accum, accum_scale, accum_zero_point = residual.data, residual.scale, residual.zero_point
        else:
            accum = residual.dequantize() if isinstance(residual, QMap) else residual
            accum, accum_scale, accum_zero_point = accum.to(self.out).contiguous(memory_format=torch.channels_last), 1.0, 0
        y = torch.ops.onednn.qconv2d_pointwise.binary(
            q.data, q.scale, q.zero_point, self.weight, self.w_scales, self.w_zero_points, accum, self.bias,
            self.stride, self.padding, self.dilation, self.groups, self.out_scale, self.out_zero_point, out_dtype,
            accum_scale, accum_zero_point, "sum", 1.0, None if self.unary == "none" else self.unary, [], "")
        return self._output(y)


class Int8Linear(_Int8Layer):
    """A FusedLinear in int8 (rows in, rows out), `out` as for Int8Conv2d."""

    def __init__(self, fused: FusedLinear, ranges: dict[str, float], out: str | torch.dtype) -> None:
        super().__init__(fused, ranges, out)
        self.weight = torch.ops.onednn.qlinear_prepack(self.int8_weight, ranges.get("in_shape"))
        del self.int8_weight

    def forward(self, x: Tensor | QMap) -> Tensor | QMap:
        q = self._input(x)
        y = torch.ops.onednn.qlinear_pointwise(
            q.data, q.scale, q.zero_point, self.weight, self.w_scales, self.w_zero_points, self.bias,
            self.out_scale, self.out_zero_point, None if self.out == "u8" else self.out, self.unary, [], "")
        return self._output(y)


class Int8ResidualBlock(nn.Module):
    """A FusedResidualBlock with u8 maps in and out; the shortcut is summed into the last
    convolution's output. Its input buffer may be overwritten (when it is the shortcut): in a
    ResNet the input of a block without downsampling is read by nothing else."""

    def __init__(self, block: FusedResidualBlock, ranges: dict[str, dict[str, float]], prefix: str) -> None:
        super().__init__()
        self.convs = nn.ModuleList(Int8Conv2d(conv, ranges[f"{prefix}.convs.{i}"], "u8") for i, conv in enumerate(block.convs))
        self.downsample = None if block.downsample is None else Int8Conv2d(block.downsample, ranges[f"{prefix}.downsample"], "u8")

    def forward(self, x: Tensor | QMap) -> QMap:
        x = self.convs[0]._input(x)
        shortcut = x if self.downsample is None else self.downsample(x)
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1](x, residual=shortcut)


def _upsample(x: QMap, size) -> QMap:
    return QMap(F.interpolate(x.data, size=size, mode="nearest").contiguous(memory_format=torch.channels_last),
                x.scale, x.zero_point)


class Int8FPN(nn.Module):
    """A FusedFPN: u8 laterals with the top-down map summed in, float outputs."""

    def __init__(self, fpn: FusedFPN, ranges: dict[str, dict[str, float]], prefix: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(Int8Conv2d(b, ranges[f"{prefix}.inner_blocks.{i}"], "u8") for i, b in enumerate(fpn.inner_blocks))
        self.layer_blocks = nn.ModuleList(Int8Conv2d(b, ranges[f"{prefix}.layer_blocks.{i}"], dtype) for i, b in enumerate(fpn.layer_blocks))

    def forward(self, x: dict[str, Tensor | QMap]) -> dict[str, Tensor]:
        names, levels = list(x.keys()), list(x.values())
        last_inner = self.inner_blocks[-1](levels[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(levels) - 2, -1, -1):
            top_down = _upsample(last_inner, levels[idx].data.shape[-2:])
            last_inner = self.inner_blocks[idx](levels[idx], residual=top_down)
            results.insert(0, self.layer_blocks[idx](last_inner))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return dict(zip(names + ["pool"], results))


def _convert_sequence(sequence: nn.Sequential, ranges: dict, prefix: str, dtype: torch.dtype) -> int:
    """The fused convs and linears of a Sequential (nested Sequentials run in order, so its leaves
    are its order of execution) in int8: u8 out where the next leaf is another int8 layer, float
    out where anything else reads it (a Flatten, the next stage). Returns how many were converted.
    A tree with anything but Sequentials above its leaves is left float."""
    if not all(isinstance(m, nn.Sequential) for m in sequence.modules() if list(m.children())):
        return 0
    leaves = [(name, m) for name, m in sequence.named_modules() if not list(m.children()) and not isinstance(m, nn.Identity)]
    converted = 0
    for position, (name, layer) in enumerate(leaves):
        if not isinstance(layer, (FusedConv2d, FusedLinear)):
            continue
        following = leaves[position + 1][1] if position + 1 < len(leaves) else None
        out = "u8" if isinstance(following, (FusedConv2d, FusedLinear)) else dtype
        make = Int8Conv2d if isinstance(layer, FusedConv2d) else Int8Linear
        parent_name, _, child = name.rpartition(".")
        parent = sequence.get_submodule(parent_name) if parent_name else sequence
        setattr(parent, child, make(layer, ranges[f"{prefix}.{name}"], out))
        converted += 1
    return converted


def convert_backbone(model: nn.Module, ranges: dict[str, dict[str, float]], dtype: torch.dtype) -> int:
    """The ResNet body and the FPN of a float32-fused MaskRCNN in int8 (in place); returns the count."""
    body = model.backbone.body
    converted = 0
    for stage_name in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(body, stage_name)
        for index, block in enumerate(stage):
            if not isinstance(block, FusedResidualBlock):
                raise ValueError("int8 needs a fused ResNet body")
            stage[index] = Int8ResidualBlock(block, ranges, f"backbone.body.{stage_name}.{index}")
            converted += len(stage[index].convs) + (stage[index].downsample is not None)
    model.backbone.fpn = Int8FPN(model.backbone.fpn, ranges, "backbone.fpn", dtype)
    return converted + 2 * len(model.backbone.fpn.inner_blocks)


def convert(model: nn.Module, ranges: dict[str, dict[str, float]], dtype: torch.dtype) -> int:
    """Replace a float32-fused MaskRCNN's layers by int8 ones (in place), using the observed
    `ranges`; float maps come out in `dtype`. Returns the number of int8 layers."""
    converted = convert_backbone(model, ranges, dtype)
    head = model.rpn.head
    if isinstance(head, FusedRPNHead):
        converted += _convert_sequence(head.conv, ranges, "rpn.head.conv", torch.float32)  # read as float32 rows
    heads = model.roi_heads
    if isinstance(heads.box_head, FusedTwoMLPHead):
        heads.box_head.fc6 = Int8Linear(heads.box_head.fc6, ranges["roi_heads.box_head.fc6"], "u8")
        heads.box_head.fc7 = Int8Linear(heads.box_head.fc7, ranges["roi_heads.box_head.fc7"], dtype)
        converted += 2
    elif isinstance(heads.box_head, nn.Sequential):
        converted += _convert_sequence(heads.box_head, ranges, "roi_heads.box_head", dtype)
    if isinstance(heads.mask_head, nn.Sequential):
        converted += _convert_sequence(heads.mask_head, ranges, "roi_heads.mask_head", dtype)
    return converted


def float_dtype() -> torch.dtype:
    """The dtype of the float maps and layers around the int8 ones: bf16 where the CPU runs it fast."""
    from segcli.device import cpu_has_fast_bf16

    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def fused_float32(model: nn.Module) -> nn.Module:
    """The model as predict's float32 CPU path runs it (BatchNorm folded, layers fused): what is
    calibrated, and what `int8_model` converts."""
    from segcli.device import prepare_for_inference

    return prepare_for_inference(model, torch.device("cpu"), "fp32", fuse=True)


def calibrate(model: nn.Module, batches) -> dict[str, dict]:
    """Ranges of every fused layer of `model` (from `fused_float32`) over `batches` of
    (images, sizes), as `convert` reads them."""
    observers = observe(model)
    try:
        with torch.inference_mode():
            for images, sizes in batches:
                model(images, sizes)
    finally:
        release(model)
    return {name: o.as_dict() for name, o in observers.items() if o.shape is not None}


def int8_model(model: nn.Module, ranges: dict[str, dict], scope: str = "all") -> tuple[nn.Module, int]:
    """A float MaskRCNN (BatchNorm not folded) -> the int8 CPU model and its number of int8 layers."""
    dtype = float_dtype()
    model = fused_float32(model)
    if scope == "backbone":
        converted = convert_backbone(model, ranges, dtype)
    else:
        converted = convert(model, ranges, dtype)
    _float_parts_to(model, dtype)
    return model, converted


def _float_parts_to(model: nn.Module, dtype: torch.dtype) -> None:
    """The layers left float (the stem; the heads under --scope backbone) in `dtype`; predictor
    layers keep float32, as in the fused float model."""
    for layer in model.modules():
        if isinstance(layer, (FusedConv2d, FusedLinear)):
            layer.weight = layer.weight.to(dtype)
            if layer.bias is not None:
                layer.bias = layer.bias.to(dtype)
    model.pool_dtype = dtype
    model.precision = "bf16" if dtype == torch.bfloat16 else "fp32"  # autocast for the unfused float layers
    model.int8 = True
