from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
COCO_TINY_VAL = SHARED_DATA / "coco_tiny" / "images" / "val2017"


@pytest.fixture(scope="session", autouse=True)
def _cpu_threads():
    # Two cores on CI: keep torch from oversubscribing them.
    torch.set_num_threads(min(2, torch.get_num_threads()))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now: for a server the test starts, or to be refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def synthetic_shapes() -> ModuleType:
    """examples/synthetic_shapes.py (an example script, not a package module), loaded by path."""
    spec = importlib.util.spec_from_file_location("synthetic_shapes", ROOT / "examples" / "synthetic_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing (../shared/data is expected beside the project)")
    return path
