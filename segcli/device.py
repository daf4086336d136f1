"""Where and in what precision the model runs: `--device` and `--precision` resolved once."""

from __future__ import annotations

import torch

from segcli.errors import UsageError
from segcli.model.cpu_fusion import FUSABLE_PRECISIONS, fuse_for_cpu, fusion_available
from segcli.model.fuse import fold_batchnorm
from segcli.model.maskrcnn import PRECISIONS, MaskRCNN


def resolve_device(spec: str) -> torch.device:
    """`auto` -> the first GPU if there is one, else the CPU; `cpu`, `cuda`, `cuda:N` as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) present")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: bfloat16 convolutions run several times faster than float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# Instructions that multiply int8 vectors into int32 sums in one step. Without them (AVX2 alone) an
# int8 layer takes several instructions per product and ONNX Runtime's int8 model runs slower than
# float32 (benchmarks/int8_feasibility.py, AMD EPYC with AVX2: 0.87x).
INT8_DOT_FLAGS = {"x86": ("amx_int8", "avx512_vnni", "avx_vnni"), "arm": ("asimddp", "i8mm")}
INT8_ANYWAY_ENV = "SEGCLI_INT8_ANYWAY"  # run int8 files on such CPUs anyway (comparisons, tests)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is not there)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_int8_dot_product() -> str | None:
    """The int8 dot-product instructions this CPU has (e.g. 'avx512_vnni'), '' when they cannot be
    read (not Linux: assumed present), None when it has none."""
    flags = cpu_flags()
    if not flags:
        return ""
    found = [f for group in INT8_DOT_FLAGS.values() for f in group if f in flags]
    return ", ".join(found) or None


def refuse_slow_int8(name: str, use_instead: str) -> None:
    """An int8 model runs only where it is faster than float32: a CPU without int8 dot products is
    a UsageError naming `use_instead`, unless INT8_ANYWAY_ENV is set."""
    import os

    if cpu_int8_dot_product() is None and os.environ.get(INT8_ANYWAY_ENV) != "1":
        raise UsageError(f"{name} is an int8 model, and this CPU has no int8 dot-product instructions (AVX-512 VNNI, "
                         f"AVX-VNNI or AMX-INT8), where it runs slower than float32: use {use_instead}, or set "
                         f"{INT8_ANYWAY_ENV}=1")


def resolve_precision(spec: str, device: torch.device) -> str:
    """`auto` -> bf16 where the hardware runs it fast (CUDA with bf16, AMX/AVX-512 CPUs), else fp32."""
    if spec == "int8":
        raise UsageError("--precision int8 runs an int8 model: make one with `segcli quantize --weights W --images "
                         "DIR --out model-int8.pt`, then pass it with --weights")
    if spec != "auto":
        if spec not in PRECISIONS:
            raise UsageError(f"--precision {spec!r}: choose auto, {', '.join(PRECISIONS)} or int8")
        if spec == "fp16" and device.type == "cpu":
            raise UsageError("--precision fp16 is for GPUs; on a CPU use bf16 or fp32")
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def fuses_on(device: torch.device, precision: str) -> bool:
    """Whether `prepare_for_inference(fuse=True)` fuses: CPUs only (on CUDA, cuDNN and the Triton
    kernels are the fast path), in float32 or bfloat16, where torch has oneDNN's fused operators."""
    return device.type == "cpu" and precision in FUSABLE_PRECISIONS and fusion_available()


def prepare_for_inference(model: MaskRCNN, device: torch.device, precision: str, fuse: bool = False) -> MaskRCNN:
    """Move the model, fold its BatchNorms, set its precision, and use channels_last (faster
    convolutions on CPU and GPU). With `fuse`, on a CPU, convolutions and linear layers also run
    with their ReLU and residual add as single oneDNN primitives (segcli.model.cpu_fusion); export
    leaves it off, since the exported graph must consist of standard operators."""
    model = model.to(device).eval()
    fold_batchnorm(model)
    model.precision = precision
    fused = fuse and fuses_on(device, precision)
    if fused:
        fuse_for_cpu(model, precision)
    if precision != "fp32" or device.type == "cuda" or fused:  # fused layers read rows of channels
        model = model.to(memory_format=torch.channels_last)
    return model
