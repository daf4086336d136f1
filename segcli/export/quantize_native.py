"""`segcli quantize --out model-int8.pt`: an int8 checkpoint that segcli's own pipeline runs.

The file is a segcli checkpoint: the float weights it was made from, plus `meta["int8"]`, the
activation ranges of every layer measured on the user's photos (segcli.model.int8). predict
rounds the weights to int8 per output channel and prepacks them when it loads the file (the
rounding is deterministic, so storing int8 weights as well would only add a second copy), and
runs the int8 layers inside the same batched pipeline as bf16: RPN decoding, NMS, RoIAlign and
mask pasting are unchanged. That is why this route is faster than the ONNX Runtime file (`--out
model-int8.onnx`), whose int8 convolutions are fast but whose graph around them is not.

`meta["int8"]["sha256"]` is the digest of the state dict and the ranges; predict refuses a file
whose contents no longer match it (exit 3).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from segcli.errors import UsageError, WeightsError
from segcli.export.quantize import QuantizeOptions, QuantizeSummary, agreement_of, check_options, run_quantize, split_photos
from segcli.weights import Checkpoint

FORMAT_VERSION = 1


def int8_digest(state_dict: dict[str, torch.Tensor], ranges: dict, scope: str) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes, in name order) and of the ranges."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    digest.update(json.dumps({"ranges": ranges, "scope": scope}, sort_keys=True).encode())
    return digest.hexdigest()


def check_int8_checkpoint(checkpoint: Checkpoint, precision: str, device: torch.device) -> None:
    """Refuse what cannot or should not run: a wrong --precision or --device (exit 2), a CPU
    without int8 dot products (exit 2), a file changed after it was written (exit 3)."""
    from segcli.device import refuse_slow_int8
    from segcli.model.int8 import int8_kernels_available

    section = checkpoint.int8
    name = Path(checkpoint.meta.get("file", checkpoint.source)).name
    made_from = section.get("weights", "the float weights it was made from")
    if precision not in ("auto", "int8"):
        raise UsageError(f"--precision {precision}: {name} is an int8 model (segcli quantize); use --precision "
                         f"auto or int8 with it, or {made_from} for {precision}")
    if device.type != "cpu":
        raise UsageError(f"--device {device}: {name} is an int8 model for the CPU; use --device cpu, or {made_from} "
                         "on the GPU")
    if not int8_kernels_available():
        raise UsageError(f"{name} is an int8 model, and this torch build has no oneDNN int8 operators; use {made_from}")
    refuse_slow_int8(name, made_from)
    if section.get("version") != FORMAT_VERSION or not isinstance(section.get("ranges"), dict):
        raise WeightsError(f"{name}: int8 section of version {section.get('version')!r}; this segcli reads {FORMAT_VERSION}")
    if int8_digest(checkpoint.state_dict, section["ranges"], section.get("scope", "all")) != section.get("sha256"):
        raise WeightsError(f"{name} was changed after segcli quantize wrote it (its sha256 no longer matches "
                           "its contents); quantize the float weights again")


def load_int8(model, checkpoint: Checkpoint):
    """The float model built from an int8 checkpoint -> (the int8 CPU model, int8 layer count)."""
    from segcli.model.int8 import int8_model

    section = checkpoint.int8
    try:
        return int8_model(model, section["ranges"], section.get("scope", "all"))
    except KeyError as missing:
        raise WeightsError(f"{checkpoint.source}: no int8 range for layer {missing}; quantize the float weights again") from None


def quantize(options: QuantizeOptions, log=lambda message: None) -> QuantizeSummary:
    """`segcli quantize`: a .pt --out is segcli's int8 checkpoint, a .onnx one ONNX Runtime's file
    (each route checks the options first)."""
    if Path(options.out).suffix.lower() == ".onnx":
        return run_quantize(options, log)
    return run_native_quantize(options, log)


def run_native_quantize(options: QuantizeOptions, log) -> QuantizeSummary:
    """Calibrate the float model on the photos, check agreement on the held-out ones, write the
    int8 checkpoint atomically."""
    from segcli.export.run import read_photos
    from segcli.export.verify import collate
    from segcli.model.build import model_from_checkpoint
    from segcli.model.int8 import calibrate, fused_float32, int8_model
    from segcli.model.roi_heads import DetectionSettings
    from segcli.weights import resolve_weights, save_checkpoint

    check_options(options)
    started = time.perf_counter()
    calibration, held_out = split_photos(options.images, options.calibration_images)
    checkpoint = resolve_weights(options.weights, options.arch)
    if checkpoint.int8 is not None:
        raise UsageError(f"--weights {options.weights} is already an int8 model; quantize the float weights it was "
                         f"made from ({checkpoint.int8.get('weights')})")
    settings = DetectionSettings(score_threshold=options.score_thr, max_detections=options.max_det)

    def fresh():
        return model_from_checkpoint(checkpoint, settings)

    reference = fused_float32(fresh())
    photos = read_photos(calibration)
    log(f"calibrating on {len(photos)} photo{'' if len(photos) == 1 else 's'} ...")
    ranges = calibrate(reference, (collate([image]) for image in photos))
    candidate, layers = int8_model(fresh(), ranges, options.scope)
    agreement = None
    if options.verify:
        log(f"comparing with float32 on {len(held_out)} held-out photo{'' if len(held_out) == 1 else 's'} ...")
        agreement = agreement_of(reference, candidate, read_photos(held_out))
        if agreement.fraction < options.min_agreement:
            raise WeightsError(f"the int8 model lost too much, nothing was written: {agreement}, below "
                               f"--min-agreement {options.min_agreement}; try --scope backbone or more "
                               "--calibration-images")
    digest = int8_digest(checkpoint.state_dict, ranges, options.scope)
    meta = {k: v for k, v in checkpoint.meta.items() if k != "file"}
    meta["int8"] = {"version": FORMAT_VERSION, "scope": options.scope, "layers": layers, "ranges": ranges,
                    "calibration_images": len(calibration), "weights": options.weights, "sha256": digest,
                    "method": "segcli int8: oneDNN u8 x s8, per-channel symmetric weights, asymmetric u8 "
                              "activations, min/max ranges"}
    save_checkpoint(options.out, checkpoint.state_dict, checkpoint.arch, checkpoint.categories,
                    checkpoint.label_to_category_id, meta)
    size = Path(options.out).stat().st_size
    return QuantizeSummary(Path(options.out), size, size, time.perf_counter() - started, layers,
                           [p.name for p in calibration], agreement, digest)
