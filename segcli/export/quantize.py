"""`segcli quantize`: an int8 model, calibrated on the user's own photos, in one of two forms.

`--out model-int8.pt` (segcli.export.quantize_native): an int8 checkpoint that segcli's own
pipeline runs, with oneDNN's int8 layers inside the bf16 pipeline; the faster form.

`--out model-int8.onnx`, this module: the checkpoint is exported to ONNX as `segcli export` does, then ONNX
Runtime's post-training static quantization rewrites its convolutions and fully connected layers
into QDQ int8 (per-channel int8 weights, uint8 activations, MinMax ranges measured on the
calibration photos). ONNX Runtime runs those as int8 kernels that use VNNI / AMX-INT8 where the CPU
has them, and `segcli predict --weights model-int8.onnx` already runs ONNX files, so the int8 model
needs no new runtime. PT2E (torch.ao) was measured too (benchmarks/int8_feasibility.py): it needs
torch.compile with a C++ toolchain on the user's machine and a compile on every new shape.

What stays float32: pre-processing, the layers that write scores, box deltas and mask logits (a
coarse step there moves every detection), RoIAlign, NMS and mask pasting.

The file carries the export's metadata plus `precision: int8`, what was quantized, and the sha256
of its graph (`graph_sha256`), which predict checks on load: a changed or damaged file is refused.
Before the file is written, the int8 model and the float32 export run on held-out photos and must
agree on at least `--min-agreement` of the float32 detections (same class, box IoU >= 0.5).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from segcli.atomic import atomic_write
from segcli.data.sources import expand_sources
from segcli.errors import UsageError, WeightsError
from segcli.export.metadata import graph_digest
from segcli.paths_guard import Output, file_inputs, refuse_overwrites

SCOPES = ("backbone", "all")
# Layers whose outputs are read as scores, box deltas or mask logits: kept in float32.
PREDICTOR_LAYERS = ("cls_logits", "bbox_pred", "cls_score", "mask_fcn_logits")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
AGREEMENT_SCORE, AGREEMENT_IOU = 0.5, 0.5
HELD_OUT = 4  # photos kept out of calibration to measure agreement (when there are enough)


@dataclass
class QuantizeOptions:
    weights: str
    images: list[str]
    out: str
    arch: str | None = None
    calibration_images: int = 32
    scope: str = "all"
    min_agreement: float = 0.9
    verify: bool = True
    # The float32 export checked against the eager model first (segcli export's verification);
    # benchmarks of seeded random weights, whose near-tied scores can flip, turn it off.
    check_export: bool = True
    score_thr: float = 0.05
    max_det: int = 100


@dataclass
class Agreement:
    kept: int = 0  # float32 detections (score >= AGREEMENT_SCORE) the int8 model also finds
    total: int = 0
    added: int = 0  # int8 detections above the score with no float32 partner
    images: int = 0

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else self.kept / self.total

    def __str__(self) -> str:
        return (f"int8 keeps {self.kept} of {self.total} float32 detections ({100 * self.fraction:.0f}%; same class, "
                f"box IoU >= {AGREEMENT_IOU}, score >= {AGREEMENT_SCORE}) and adds {self.added}, on {self.images} "
                f"held-out photo{'' if self.images == 1 else 's'}")


@dataclass
class QuantizeSummary:
    path: Path
    bytes: int
    float_bytes: int
    seconds: float
    quantized_layers: int
    calibration: list[str]
    agreement: Agreement | None
    sha256: str
    notes: list[str] = field(default_factory=list)


def check_options(options: QuantizeOptions) -> None:
    """Every flag error before anything is loaded or written."""
    from segcli.export.onnx import require

    out = Path(options.out)
    if options.out in ("", "-") or out.is_dir() or out.suffix.lower() not in (".pt", ".onnx"):
        raise UsageError(f"--out {options.out!r}: give a file name ending in .pt (segcli's int8 model, the faster) "
                         "or .onnx (ONNX Runtime's), such as model-int8.pt")
    if not options.images:
        raise UsageError("--images: give the photos to calibrate on (files, folders or globs), ideally ones like "
                         "those the model will see")
    if options.calibration_images < 1:
        raise UsageError(f"--calibration-images must be at least 1, got {options.calibration_images}")
    if options.scope not in SCOPES:
        raise UsageError(f"--scope {options.scope!r}: choose {' or '.join(SCOPES)}")
    if not 0.0 <= options.min_agreement <= 1.0:
        raise UsageError(f"--min-agreement must be in [0, 1], got {options.min_agreement}")
    inputs = file_inputs("--weights", [options.weights]) + [("--images", i.path) for i in expand_sources(options.images)]
    refuse_overwrites(inputs, [Output("--out", out)])
    if out.suffix.lower() == ".onnx":
        require("onnx", "quantization")
        require("onnxruntime", "quantization")
    else:
        from segcli.model.int8 import int8_kernels_available

        if not int8_kernels_available():
            raise UsageError("this torch build has no oneDNN int8 operators, which a .pt int8 model needs; "
                             "use --out model-int8.onnx (ONNX Runtime)")


def spread(items: list, count: int) -> list:
    """`count` of `items` evenly spaced from first to last (all of them when there are no more)."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def split_photos(specs: list[str], count: int) -> tuple[list[Path], list[Path]]:
    """(calibration photos, held-out photos): up to `count` spread evenly over the sorted list, and
    up to HELD_OUT others (a quarter at most) for the agreement check (the calibration photos when
    there are no others)."""
    paths = sorted({Path(i.path) for i in expand_sources(specs) if not getattr(i, "is_video", False)})
    if not paths:
        raise UsageError(f"--images {' '.join(specs)}: no images found")
    # A quarter at most is held out, so that a small folder still calibrates on most of its photos.
    picked = spread(paths, min(count, len(paths) - min(HELD_OUT, len(paths) // 4)))
    others = [p for p in paths if p not in set(picked)]
    return picked, spread(others, HELD_OUT) or picked[:HELD_OUT]


def layers_to_quantize(model, scope: str) -> list[str]:
    """Names of the Conv / Gemm / MatMul nodes to rewrite, predictor layers excluded."""
    names = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS or any(f"/{layer}" in node.name for layer in PREDICTOR_LAYERS):
            continue
        if scope == "backbone" and not node.name.startswith("/backbone/"):
            continue
        names.append(node.name)
    return names


def _preprocess(source: Path, target: Path, notes: list[str]) -> Path:
    """ONNX Runtime's pre-quantization pass (constant folding, shape inference): folded-BatchNorm
    biases computed by nodes become initializers, so their convolutions can be quantized whole."""
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
        return target
    except Exception as error:  # the export as written still quantizes, a few layers less well
        notes.append(f"ONNX Runtime's pre-processing failed ({type(error).__name__}); quantized the export as written")
        return source


def _calibrate_and_quantize(source: Path, target: Path, layers: list[str], photos: list[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(photos)

        def get_next(self):
            image = next(self.feeds, None)
            return None if image is None else {"images": np.ascontiguousarray(image)[None],
                                               "sizes": np.array([image.shape[:2]], np.int64)}

    quantize_static(str(source), str(target), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                    nodes_to_quantize=layers, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False})


def agreement_of(reference, candidate, photos: list[np.ndarray]) -> Agreement:
    """How many of the float32 model's confident detections the int8 model also makes."""
    from torchvision.ops import box_iou

    from segcli.export.verify import collate

    result = Agreement(images=len(photos))
    for image in photos:
        batch, sizes = collate([image])
        with torch.inference_mode():
            want, got = reference(batch, sizes), candidate(batch, sizes)
        ref, cand = want.scores >= AGREEMENT_SCORE, got.scores >= AGREEMENT_SCORE
        ref_boxes, ref_labels = want.boxes[ref], want.labels[ref]
        cand_boxes, cand_labels = got.boxes[cand], got.labels[cand]
        free = torch.ones(len(cand_boxes), dtype=torch.bool)
        overlaps = box_iou(ref_boxes, cand_boxes)  # [0, n] or [n, 0] when either side found nothing
        for i in range(len(ref_boxes)):  # best float32 first (rows are sorted by score)
            fits = free & (cand_labels == ref_labels[i]) & (overlaps[i] >= AGREEMENT_IOU)
            if fits.any():
                j = int(torch.where(fits, overlaps[i], torch.tensor(-1.0)).argmax())
                free[j] = False
                result.kept += 1
        result.total += len(ref_boxes)
        result.added += int(free.sum())
    return result


def run_quantize(options: QuantizeOptions, log=lambda message: None) -> QuantizeSummary:
    """The ONNX route (segcli.export.quantize_native.quantize dispatches by --out): export,
    calibrate, quantize, check agreement, write atomically; SegcliError on a user or model error."""
    import json

    import onnx

    from segcli.export.metadata import KEY
    from segcli.export.onnx import load_onnx
    from segcli.export.run import ExportOptions, read_photos, run_export
    from segcli.export.runtime import ExportedModel

    check_options(options)
    started = time.perf_counter()
    calibration, held_out = split_photos(options.images, options.calibration_images)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="segcli-quantize-") as folder:
        work = Path(folder)
        float_path = work / "float32.onnx"
        log(f"exporting {options.weights} to ONNX ...")
        run_export(ExportOptions(weights=options.weights, format="onnx", out=str(float_path), arch=options.arch,
                                 images=[str(p) for p in held_out],
                                 verify=options.verify and options.check_export,
                                 score_thr=options.score_thr, max_det=options.max_det))
        float_meta = json.loads(next(p.value for p in onnx.load(str(float_path)).metadata_props if p.key == KEY))
        source = _preprocess(float_path, work / "prepared.onnx", notes)
        layers = layers_to_quantize(onnx.load(str(source)), options.scope)
        if not layers:
            raise WeightsError(f"{options.weights}: the export has no layers to quantize in scope {options.scope!r}")
        log(f"calibrating {len(layers)} layers on {len(calibration)} photo{'' if len(calibration) == 1 else 's'} ...")
        int8_path = work / "int8.onnx"
        _calibrate_and_quantize(source, int8_path, layers, read_photos(calibration))
        quantized = onnx.load(str(int8_path))
        del quantized.metadata_props[:]
        meta = dict(float_meta, precision="int8", graph_sha256=graph_digest(quantized),
                    quantization={"method": "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 "
                                            "activations, MinMax", "scope": options.scope, "layers": len(layers),
                                  "calibration_images": len(calibration),
                                  "onnxruntime": __import__("onnxruntime").__version__})
        entry = quantized.metadata_props.add()
        entry.key, entry.value = KEY, json.dumps(meta)
        data = quantized.SerializeToString()
        agreement = None
        if options.verify:
            int8_path.write_bytes(data)
            log(f"comparing with float32 on {len(held_out)} held-out photo{'' if len(held_out) == 1 else 's'} ...")
            threads = torch.get_num_threads()
            reference = ExportedModel(*load_onnx(float_path, threads), float_path)
            candidate = ExportedModel(*load_onnx(int8_path, threads), int8_path)
            agreement = agreement_of(reference, candidate, read_photos(held_out))
            if agreement.fraction < options.min_agreement:
                raise WeightsError(f"the int8 model lost too much, nothing was written: {agreement}, below "
                                   f"--min-agreement {options.min_agreement}; try --scope backbone or more "
                                   "--calibration-images")
        float_bytes = float_path.stat().st_size
    with atomic_write(Path(options.out), "wb") as handle:
        handle.write(data)
    return QuantizeSummary(Path(options.out), len(data), float_bytes, time.perf_counter() - started, len(layers),
                           [p.name for p in calibration], agreement, hashlib.sha256(data).hexdigest(), notes)
