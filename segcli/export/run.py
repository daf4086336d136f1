"""`segcli export`: a checkpoint -> a TorchScript or ONNX file of the whole pipeline, verified.

Steps: check the flags (and, for ONNX, that the optional packages are there) before anything
slow; load the checkpoint and build the eager model in float32 on the CPU with BatchNorm folded
and the export's detection settings; trace the export graph on real photos; write the file to a
temporary name beside `--out`; load it back through the same runtime `segcli predict` uses and
compare it with the eager model on the sample photos; only then rename it into place. A failed
verification leaves nothing behind (and an existing `--out` untouched).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from segcli import __version__
from segcli.atomic import atomic_write
from segcli.data.images import ImageReadError, read_image
from segcli.data.sources import expand_sources
from segcli.device import prepare_for_inference
from segcli.errors import UsageError, WeightsError
from segcli.export import metadata as meta_doc
from segcli.export.graph import INPUT_NAMES, OUTPUT_NAMES, ExportableMaskRCNN
from segcli.export.verify import Verification, collate, verify_export
from segcli.model.build import model_from_checkpoint
from segcli.model.roi_heads import CUDA_CANDIDATE_CAP, DetectionSettings
from segcli.paths_guard import Output, file_inputs, refuse_overwrites
from segcli.weights import resolve_weights

FORMATS = ("torchscript", "onnx")
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "export" / "samples"
MAX_SAMPLES = 4  # verification photos taken from --images; each costs two eager + two exported runs
MIN_IMAGE_SIZE = 32
# Tracing and verification run a whole fixed-size batch at once: [batch, H, W, 3] images in memory.
MAX_BATCH, MAX_IMAGE_SIZE = 256, 8192


@dataclass
class ExportOptions:
    weights: str
    format: str
    out: str
    arch: str | None = None
    opset: int | None = None  # ONNX only; None: DEFAULT_OPSET
    batch: int | None = None  # None: dynamic
    image_size: tuple[int, int] | None = None  # (height, width); None: dynamic
    images: list[str] = field(default_factory=list)  # verification photos; empty: the bundled samples
    verify: bool = True
    score_thr: float = 0.05
    max_det: int = 100
    # Candidates entering the final NMS per image (a fixed size keeps the graph static; as CUDA predict).
    candidate_cap: int = CUDA_CANDIDATE_CAP


@dataclass
class ExportSummary:
    path: Path
    format: str
    bytes: int
    seconds: float
    verification: Verification | None
    samples: list[str]


def check_options(options: ExportOptions) -> None:
    """Every flag error before anything is loaded or written."""
    if options.format not in FORMATS:
        raise UsageError(f"--format {options.format!r}: choose torchscript or onnx")
    out = Path(options.out)
    if options.out in ("", "-") or out.is_dir():
        raise UsageError(f"--out {options.out!r}: give a file name such as model.{'onnx' if options.format == 'onnx' else 'ts'}")
    if options.format == "onnx" and out.suffix.lower() != ".onnx":
        raise UsageError(f"--out {options.out!r}: ONNX files must end in .onnx (that is how predict recognizes them)")
    if options.opset is not None:
        from segcli.export.onnx import OPSETS

        if options.format != "onnx":
            raise UsageError("--opset applies to --format onnx only")
        if options.opset not in OPSETS:
            raise UsageError(f"--opset {options.opset}: choose {OPSETS.start} to {OPSETS.stop - 1}")
    if options.batch is not None and options.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {options.batch}")
    if options.batch is not None and options.batch > MAX_BATCH:
        raise UsageError(f"--batch must be at most {MAX_BATCH}, got {options.batch}")
    if options.image_size is not None:
        size = f"--image-size {options.image_size[0]} {options.image_size[1]}"
        if min(options.image_size) < MIN_IMAGE_SIZE:
            raise UsageError(f"{size}: both sides must be at least {MIN_IMAGE_SIZE}")
        if max(options.image_size) > MAX_IMAGE_SIZE:
            raise UsageError(f"{size}: both sides must be at most {MAX_IMAGE_SIZE}")
    if not 0.0 <= options.score_thr < 1.0:
        raise UsageError(f"--score-thr must be in [0, 1), got {options.score_thr}")
    if options.max_det < 1:
        raise UsageError(f"--max-det must be at least 1, got {options.max_det}")
    inputs = file_inputs("--weights", [options.weights])
    if options.images:
        inputs += [("--images", item.path) for item in expand_sources(options.images)]
    refuse_overwrites(inputs, [Output("--out", out)])
    if options.format == "onnx":
        from segcli.export.onnx import require

        require("onnx", "ONNX export")
        if options.verify:
            require("onnxruntime", "verifying an ONNX export (or skip it with --no-verify)")


def load_samples(specs: list[str]) -> list[tuple[str, np.ndarray]]:
    """Verification photos: the first MAX_SAMPLES images of `specs`, else the bundled samples."""
    if specs:
        items = [item for item in expand_sources(specs) if not getattr(item, "is_video", False)][:MAX_SAMPLES]
        paths = [item.path for item in items]
        if not paths:
            raise UsageError(f"--images {' '.join(specs)}: no images found")
    else:
        paths = sorted(SAMPLES_DIR.glob("*.jpg"))
    return [(Path(path).name, image) for path, image in zip(paths, read_photos(paths))]


def read_photos(paths: list) -> list[np.ndarray]:
    """Each photo decoded; one that cannot be read is a UsageError naming it (they come from --images)."""
    photos = []
    for path in paths:
        try:
            photos.append(read_image(path))
        except ImageReadError as error:
            raise UsageError(f"--images: {error}") from None
    return photos


def fit_samples(samples: list[tuple[str, np.ndarray]], image_size: tuple[int, int] | None) -> list[tuple[str, np.ndarray]]:
    """Samples as a fixed-size export sees them (scaled down to fit its canvas), so that the eager
    reference gets the same pixels."""
    if image_size is None:
        return samples
    from segcli.export.runtime import fit_image

    return [(name, fit_image(torch.from_numpy(np.ascontiguousarray(image)), *image_size)[0].numpy()) for name, image in samples]


def example_input(samples: list[tuple[str, np.ndarray]], options: ExportOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The traced input: real photos (so every stage sees detections), in the fixed canvas and batch if set."""
    count = options.batch or min(2, len(samples))
    images = [samples[i % len(samples)][1] for i in range(count)]
    batch, sizes = collate(images)
    if options.image_size is not None:
        canvas = torch.zeros((count, *options.image_size, 3), dtype=torch.uint8)
        canvas[:, : batch.shape[1], : batch.shape[2]] = batch
        batch = canvas
    return batch, torch.tensor(sizes, dtype=torch.int64)


def build_metadata(checkpoint, model, options: ExportOptions, opset: int | None) -> str:
    settings = model.roi_heads.settings
    doc = {
        "format": meta_doc.FORMAT,
        "version": meta_doc.VERSION,
        "export_format": options.format,
        "opset": opset,
        "arch": checkpoint.arch,
        "categories": checkpoint.categories,
        "label_to_category_id": checkpoint.label_to_category_id,
        "score_threshold": settings.score_threshold,
        "max_detections": settings.max_detections,
        "nms_threshold": settings.nms_threshold,
        "candidate_cap": options.candidate_cap,
        "min_size": model.resize.min_size,
        "max_size": model.resize.max_size,
        "batch": options.batch,
        "image_size": list(options.image_size) if options.image_size else None,
        "inputs": {INPUT_NAMES[0]: "uint8 [B, H, W, 3] RGB, image i in [:h_i, :w_i]",
                   INPUT_NAMES[1]: "int64 [B, 2] (h_i, w_i)"},
        "outputs": list(OUTPUT_NAMES),
        "masks": meta_doc.MASKS,
        "segcli_version": __version__,
        "weights": options.weights,
        "source": {k: v for k, v in checkpoint.meta.items() if isinstance(v, (str, int, float, bool))},
    }
    return json.dumps(doc)


def run_export(options: ExportOptions, log=lambda message: None) -> ExportSummary:
    """Export, verify, write; raises SegcliError (nothing written) on a user or verification error."""
    check_options(options)
    started = time.perf_counter()
    samples = fit_samples(load_samples(options.images), options.image_size)
    checkpoint = resolve_weights(options.weights, options.arch)
    if (section := checkpoint.int8) is not None:
        raise UsageError(f"--weights {options.weights} is an int8 model, which runs in segcli predict only; export "
                         f"the float weights it was made from ({section.get('weights')}), or make an int8 ONNX "
                         "file with segcli quantize --out model-int8.onnx")
    settings = DetectionSettings(score_threshold=options.score_thr, max_detections=options.max_det,
                                 candidate_cap=options.candidate_cap)
    model = model_from_checkpoint(checkpoint, settings)
    known = {c["id"] for c in checkpoint.categories}
    model.roi_heads.restrict_labels([cid in known for cid in checkpoint.label_to_category_id])
    # float32 on the CPU, BatchNorm folded: what the exported graph computes (see engine.device).
    model = prepare_for_inference(model, torch.device("cpu"), "fp32")
    graph = ExportableMaskRCNN(model, options.format, options.candidate_cap).eval()
    example = example_input(samples, options)
    opset = None
    out = Path(options.out)
    log(f"exporting {checkpoint.arch} to {options.format} ...")
    if options.format == "onnx":
        from segcli.export.onnx import DEFAULT_OPSET, onnx_bytes

        opset = options.opset or DEFAULT_OPSET
        data = onnx_bytes(graph, example, build_metadata(checkpoint, model, options, opset), opset,
                          options.batch is None, options.image_size is None)
    else:
        from segcli.export.torchscript import torchscript_bytes

        data = torchscript_bytes(graph, example, build_metadata(checkpoint, model, options, opset))
    verification = None
    if options.verify:
        log(f"verifying on {len(samples)} photo{'' if len(samples) == 1 else 's'} ...")
        # Verified from a file, loaded exactly as predict loads it, before --out is touched.
        with tempfile.TemporaryDirectory(prefix="segcli-export-") as folder:
            candidate = Path(folder) / out.name
            candidate.write_bytes(data)
            verification = _verify(model, candidate, options, samples)
    with atomic_write(out, "wb") as handle:
        handle.write(data)
    size = len(data)
    return ExportSummary(out, options.format, size, time.perf_counter() - started, verification, [n for n, _ in samples])


def _verify(model, path: Path, options: ExportOptions, samples) -> Verification:
    """Load the written file as predict will, compare with the eager model; raise if they differ."""
    from segcli.export.runtime import ExportedModel

    if options.format == "onnx":
        from segcli.export.onnx import load_onnx

        run, metadata = load_onnx(path, threads=torch.get_num_threads())
    else:
        from segcli.export.torchscript import load_torchscript

        run, metadata = load_torchscript(path)
    verification = verify_export(model, ExportedModel(run, metadata, Path(options.out)), samples)
    if not verification.passed:
        name, report = verification.worst()
        raise WeightsError(f"verification failed, nothing was written: the exported model differs from the eager model "
                           f"({verification}; worst: {name}: {report}); --no-verify skips this check")
    return verification
