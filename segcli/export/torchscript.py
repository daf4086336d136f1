"""TorchScript: trace the export graph, save it with its metadata, load it back."""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from segcli.errors import WeightsError
from segcli.export.metadata import KEY, parse_metadata

EXTRA_FILE = KEY + ".json"


def torchscript_bytes(graph: torch.nn.Module, example: tuple[Tensor, Tensor], metadata: str) -> bytes:
    """Trace `graph` on `example`: the archive, metadata included."""
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every shape it reads; the graph reads them as tensors on purpose.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: metadata})
    return buffer.getvalue()


def is_torchscript_export(path: Path) -> bool:
    """A TorchScript archive carrying segcli's metadata (plain checkpoints are zip files too)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/extra/" + EXTRA_FILE) for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_torchscript(path: Path):
    """(run(images, sizes) -> 5 tensors, metadata) of a TorchScript export, on the CPU."""
    import torchvision  # noqa: F401  (registers torchvision::nms and roi_align, which the graph calls)

    extra = {EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError/ValueError of many shapes for bad archives
        raise WeightsError(f"cannot load the TorchScript model {path}: {str(exc).strip().splitlines()[0][:200]}") from None
    metadata = parse_metadata(extra[EXTRA_FILE], str(path))
    module.eval()

    def run(images: Tensor, sizes: Tensor) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            return tuple(module(images, sizes))

    return run, metadata
