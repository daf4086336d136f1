"""ONNX: export the graph with the TorchScript-based exporter, store metadata, run with ONNX Runtime.

`onnx` (to write metadata) and `onnxruntime` (to verify and to predict) are the optional extra
`segcli[onnx]`; without them, a one-line WeightsError says what to install.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from segcli.errors import WeightsError
from segcli.export.graph import INPUT_NAMES, OUTPUT_NAMES
from segcli.export.metadata import KEY, parse_metadata

INSTALL_HINT = 'pip install "segcli[onnx]"'
DEFAULT_OPSET = 17
# 16 added RoiAlign's coordinate_transformation_mode (torchvision's aligned=False is its
# "output_half_pixel"); 20 is the newest the TorchScript-based exporter writes.
OPSETS = range(16, 21)


def require(module: str, purpose: str):
    """Import an optional ONNX package, or explain in one line how to get it."""
    try:
        return __import__(module)
    except ImportError:
        raise WeightsError(f"{purpose} needs the '{module}' package, which is not installed: {INSTALL_HINT}") from None


def onnx_bytes(graph: torch.nn.Module, example: tuple[Tensor, Tensor], metadata: str, opset: int,
               dynamic_batch: bool, dynamic_size: bool) -> bytes:
    """Export `graph` traced on `example`: the serialized model, metadata included."""
    onnx = require("onnx", "ONNX export")
    image_axes = ({0: "batch"} if dynamic_batch else {}) | ({1: "height", 2: "width"} if dynamic_size else {})
    dynamic_axes = {name: {0: "detections"} for name in OUTPUT_NAMES}
    dynamic_axes["images"] = image_axes
    if dynamic_batch:
        dynamic_axes["sizes"] = {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings, one per shape read
        torch.onnx.export(graph, example, buffer, dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic_axes, do_constant_folding=True)
    model = onnx.load_from_string(buffer.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = KEY, metadata
    return model.SerializeToString()


def load_onnx(path: Path, threads: int | None = None):
    """(run(images, sizes) -> 5 tensors, metadata) of an ONNX export, on ONNX Runtime's CPU provider."""
    ort = require("onnxruntime", f"running {path.name}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # ONNX Runtime's warnings are about its own graph rewrites
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise WeightsError(f"cannot load the ONNX model {path}: {str(exc).strip().splitlines()[0][:200]}") from None
    metadata = parse_metadata(session.get_modelmeta().custom_metadata_map.get(KEY), str(path))

    def run(images: Tensor, sizes: Tensor) -> tuple[Tensor, ...]:
        feeds = {"images": np.ascontiguousarray(images.cpu().numpy()), "sizes": sizes.cpu().numpy().astype(np.int64)}
        return tuple(torch.from_numpy(out) for out in session.run(list(OUTPUT_NAMES), feeds))

    return run, metadata
