"""Find, download, verify and load Mask R-CNN checkpoints.

`resolve_weights` turns what the user passed to `--weights` (an http(s) URL, a registry name or
alias, or a local file) into a `Checkpoint`: a CPU state dict plus the architecture and category
table needed to build the model and name its predictions. Every failure is a one-line
`WeightsError`, and files are only ever loaded with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import pickle
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import torch

from segcli.atomic import atomic_write
from segcli.categories import coco_categories, coco_label_to_category_id
from segcli.errors import UsageError, WeightsError
from segcli.archs import ARCHS

KNOWN_ARCHS = tuple(ARCHS)  # the architectures segcli can build
CHECKPOINT_FORMAT = "segcli-checkpoint"
CHECKPOINT_VERSION = 1

def _registry_path() -> Path:
    """weights/registry.json of the source tree (editable installs), else the copy a wheel installs
    under <prefix>/share/segcli/weights (pyproject's data-files)."""
    source = Path(__file__).resolve().parent.parent / "weights" / "registry.json"
    installed = Path(sys.prefix) / "share" / "segcli" / "weights" / "registry.json"
    return source if source.is_file() or not installed.is_file() else installed


REGISTRY_PATH = _registry_path()
_CLS_KEY = "roi_heads.box_predictor.cls_score.weight"
# torch.hub's naming convention `name-<sha256 prefix>.ext`; 8+ digits so `model-1.pth` is no hash.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")
# Failures of the transfer itself; other OSErrors (disk full, unwritable cache) are reported as such.
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ValueError)
_CHUNK = 1 << 20
_TIMEOUT_S = 30


@dataclass
class Checkpoint:
    """A loaded checkpoint, ready to build a model from."""

    state_dict: dict[str, torch.Tensor]
    arch: str
    categories: list[dict]  # [{"id": int, "name": str}], the real classes only
    label_to_category_id: list[int]  # model label index -> category id; index 0 is background
    meta: dict = field(default_factory=dict)  # where it came from, how it was trained
    source: str = ""  # the spec the user passed

    @property
    def int8(self) -> dict | None:
        """The int8 calibration of a `segcli quantize --out x.pt` file (segcli.export.quantize_native)."""
        section = self.meta.get("int8")
        return section if isinstance(section, dict) else None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def cache_dir() -> Path:
    """$SEGCLI_HOME/weights, else $XDG_CACHE_HOME/segcli/weights, else ~/.cache/segcli/weights."""
    if os.environ.get("SEGCLI_HOME"):
        return Path(os.environ["SEGCLI_HOME"]).expanduser() / "weights"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "segcli" / "weights"
    return Path.home() / ".cache" / "segcli" / "weights"


def load_registry() -> dict:
    """The parsed `weights/registry.json`: entries keyed by name, plus an "aliases" object."""
    try:
        registry = json.loads(REGISTRY_PATH.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"the weights registry {REGISTRY_PATH} is missing (segcli expects its source "
                           "tree); pass a file or URL with --weights instead") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read the weights registry {REGISTRY_PATH}: {_one_line(exc)}") from None
    if not isinstance(registry, dict):
        raise WeightsError(f"the weights registry {REGISTRY_PATH} is not a JSON object")
    return registry


def registry_names() -> list[str]:
    """Every name `--weights` accepts from the registry: entries, then aliases."""
    registry = load_registry()
    return sorted(k for k in registry if k != "aliases") + sorted(registry.get("aliases", {}))


def lookup_registry(name: str, registry: dict | None = None) -> tuple[str, dict] | None:
    """(entry name, entry) for a registry name or alias; None if `name` is neither. Never downloads."""
    registry = load_registry() if registry is None else registry
    name = registry.get("aliases", {}).get(name, name)
    entry = registry.get(name) if name != "aliases" else None
    return (name, entry) if isinstance(entry, dict) else None


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(actual: str, expected: str) -> bool:
    # torchvision publishes only an 8-digit prefix of the digest, so a prefix counts as a match.
    return bool(expected) and actual.startswith(expected.lower())


def _fetch(url: str, out: IO[bytes], progress: bool) -> tuple[str, int, int | None]:
    """Stream `url` into `out`; return (sha256 hex digest, bytes received, Content-Length or None)."""
    digest, received, bar, task = hashlib.sha256(), 0, None, None
    request = urllib.request.Request(url, headers={"User-Agent": "segcli"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if progress and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
            bar = Progress(*columns, console=Console(stderr=True), transient=True)
            task = bar.add_task(Path(urlparse(url).path).name, total=expected)
        with bar if bar is not None else contextlib.nullcontext():
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(task, completed=received)
    return digest.hexdigest(), received, expected


def download(url: str, sha256: str | None, dest: Path, progress: bool = True) -> Path:
    """Download `url` to `dest`, verified against `sha256` (full digest or prefix; None skips it).

    `dest` appears only once complete and verified: a failed, short or interrupted download leaves
    neither a partial file nor a temporary one. The progress bar goes to stderr, and only when
    `progress` is true and stderr is a terminal.
    """
    dest = Path(dest)
    try:
        with atomic_write(dest, "wb") as out:
            try:
                actual, received, expected_len = _fetch(url, out, progress)
            except _NETWORK_ERRORS as exc:
                # URLError's reason is the socket error; HTTPError's str() keeps the status code.
                reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", None) or exc
                raise WeightsError(f"could not download {url}: {_one_line(reason)}. If this machine is offline, "
                                   f"download the file elsewhere and pass it with --weights /path/to/{dest.name}"
                                   ) from None
            if expected_len is not None and received != expected_len:
                raise WeightsError(f"could not download {url}: the connection closed after {received} of "
                                   f"{expected_len} bytes; nothing was kept, try again or pass a file with --weights")
            if sha256 and not _matches(actual, sha256):
                raise WeightsError(f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, "
                                   f"got {actual}; the file was discarded")
    except OSError as exc:  # the cache folder itself is unwritable or full
        raise WeightsError(f"cannot write {dest}: {_one_line(exc)}; set SEGCLI_HOME to a writable folder") from None
    return dest


def _cached_or_download(url: str, sha256: str | None, progress: bool) -> Path:
    """The cached copy of `url` if its checksum holds (no network then), else a fresh download."""
    name = Path(urlparse(url).path).name
    if not name:
        raise WeightsError(f"cannot tell a file name from the URL {url}; pass a URL that ends in a file name")
    dest = cache_dir() / name
    # A cached file that fails its checksum (corrupted on disk) is simply downloaded again.
    if dest.is_file() and (not sha256 or _matches(_sha256_of(dest), sha256)):
        return dest
    return download(url, sha256, dest, progress)


def _load_file(path: Path) -> object:
    """`torch.load(weights_only=True)` on the CPU, turning every failure into a one-line WeightsError."""
    # torchvision's reference scripts save their argparse.Namespace, which holds plain values only.
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        with safe([argparse.Namespace]) if safe else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        message = str(exc)
        # The weights-only unpickler reports refused objects and plain garbage alike; only refusals
        # name a global, an allowlist or a function call.
        if isinstance(exc, pickle.UnpicklingError) and re.search(r"GLOBAL|allowlist|reduce for", message):
            found = re.search(r"GLOBAL ([\w.]+)", message)
            what = f" ({found.group(1)})" if found else ""
            raise WeightsError(f"refused to load {path}: it contains Python objects{what} that could run code "
                               "when loaded; re-save it as a plain state dict") from None
        reason = _one_line(re.split(r"\n\s*\n|\. ", message.split("WeightsUnpickler error:")[-1].strip())[0])
        raise WeightsError(f"{path} is damaged or not a PyTorch checkpoint ({type(exc).__name__}: {reason})") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def infer_arch(state_dict: dict[str, torch.Tensor]) -> str:
    """Which of KNOWN_ARCHS `state_dict` belongs to, from its key names and shapes."""
    conv1 = state_dict.get("backbone.body.layer1.0.conv1.weight")
    bottleneck = any(k.startswith("backbone.body.layer1.0.conv3.") for k in state_dict)
    if conv1 is not None and tuple(conv1.shape) == (64, 64, 3, 3) and not bottleneck:
        return "maskrcnn_resnet18_fpn_small"  # ResNet-18 basic blocks: 3x3 first conv, no conv3
    if conv1 is not None and tuple(conv1.shape) == (32, 32, 3, 3) and not bottleneck:
        return "maskrcnn_resnet18_fpn_tiny"  # the half-width ResNet-18
    if "rpn.head.conv.1.0.weight" in state_dict and "roi_heads.box_head.0.0.weight" in state_dict:
        return "maskrcnn_resnet50_fpn_v2"
    if "roi_heads.box_head.fc6.weight" in state_dict:
        return "maskrcnn_resnet50_fpn"
    raise WeightsError(f"cannot tell the model architecture from the checkpoint; pass --arch {'/'.join(KNOWN_ARCHS)}")


def _categories_for(spec: object, num_classes: int | None, where: str) -> tuple[list[dict], list[int]]:
    """(categories, label_to_category_id) from a registry `categories` value, else the classifier size."""
    if spec == "coco" or (spec is None and num_classes == 91):
        categories, mapping = coco_categories(), coco_label_to_category_id()
    elif isinstance(spec, list) and spec:
        categories = [c if isinstance(c, dict) else {"id": i, "name": str(c)} for i, c in enumerate(spec, 1)]
        if not all(isinstance(c.get("id"), int) and isinstance(c.get("name"), str) for c in categories):
            raise WeightsError(f"the categories for {where} must be names or {{'id': int, 'name': str}} objects")
        mapping = [0] + [c["id"] for c in categories]
    elif spec is None and num_classes and num_classes > 1:
        categories = [{"id": i, "name": f"class_{i}"} for i in range(1, num_classes)]
        mapping = list(range(num_classes))
    else:
        raise WeightsError(f"cannot tell the categories of {where}: no {_CLS_KEY} and no registry categories")
    if num_classes is not None and len(mapping) != num_classes:
        raise WeightsError(f"{where} predicts {num_classes} labels but its categories give {len(mapping)}"
                           " (counting the background)")
    return categories, mapping


def _checkpoint_from(obj: object, path: Path, spec: str, arch: str | None, entry: dict) -> Checkpoint:
    """Interpret a loaded object in one of the accepted layouts: segcli, plain state dict, {"model": ...}."""
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("version") != CHECKPOINT_VERSION:
            raise WeightsError(f"{path} is a version {obj.get('version')} segcli checkpoint; this segcli reads 1")
        missing = [k for k in ("arch", "categories", "label_to_category_id", "model") if k not in obj]
        if missing or not _is_state_dict(obj["model"]):
            raise WeightsError(f"{path} is an incomplete segcli checkpoint (bad: {', '.join(missing) or 'model'})")
        if arch and arch != obj["arch"]:
            raise WeightsError(f"{path} holds a {obj['arch']} model but --arch {arch} was given; drop --arch")
        return Checkpoint(obj["model"], obj["arch"], list(obj["categories"]), list(obj["label_to_category_id"]),
                          dict(obj.get("meta") or {}, file=str(path)), spec)
    if _is_state_dict(obj):
        state_dict, layout = obj, "state_dict"
    elif isinstance(obj, dict) and _is_state_dict(obj.get("model")):
        state_dict, layout = obj["model"], "torchvision-reference"
    else:
        raise WeightsError(f"{path} is not a Mask R-CNN checkpoint: expected a state dict, "
                           "{'model': state_dict} or a segcli checkpoint")
    arch = arch or entry.get("arch") or infer_arch(state_dict)
    cls = state_dict.get(_CLS_KEY)
    num_classes = None if cls is None else int(cls.shape[0])
    categories, mapping = _categories_for(entry.get("categories"), num_classes, str(path))
    meta = {"file": str(path), "layout": layout}
    meta.update((k, entry[k]) for k in ("registry_name", "url", "description") if k in entry)
    return Checkpoint(state_dict, arch, categories, mapping, meta, spec)


def resolve_weights(spec: str, arch: str | None = None, progress: bool = True) -> Checkpoint:
    """Load what `--weights` names: an http(s) URL, a registry name or alias, or a local file, in that order.

    URL and registry files are downloaded into `cache_dir()` once and reused offline afterwards. `arch`
    sets the architecture of a plain state dict; otherwise it comes from the registry, else the keys.
    """
    if arch is not None and arch not in KNOWN_ARCHS:
        raise UsageError(f"unknown --arch {arch!r}; choose one of {', '.join(KNOWN_ARCHS)}")
    entry, parsed, is_file = {}, urlparse(spec), Path(spec).expanduser().is_file()
    if parsed.scheme in ("http", "https"):
        found = _HASH_IN_NAME.search(Path(parsed.path).name)
        path = _cached_or_download(spec, found.group(1) if found else None, progress)
    # A missing registry (e.g. a wheel install) must not stop a local file from loading.
    elif (REGISTRY_PATH.is_file() or not is_file) and (found := lookup_registry(spec)) is not None:
        name, entry = found[0], dict(found[1], registry_name=found[0])
        if isinstance(entry.get("file"), str):  # shipped in weights/ beside the registry: no download
            path = REGISTRY_PATH.parent / entry["file"]
            if not path.is_file():
                raise WeightsError(f"the weights registry entry {name!r} names {path}, which is missing")
            if entry.get("sha256") and not _matches(_sha256_of(path), entry["sha256"]):
                raise WeightsError(f"{path} does not match its registry checksum {entry['sha256']}; reinstall segcli")
        elif not isinstance(entry.get("url"), str):
            raise WeightsError(f"the weights registry entry {name!r} has no 'url' or 'file'")
        else:
            path = _cached_or_download(entry["url"], entry.get("sha256"), progress)
    elif is_file:
        path = Path(spec).expanduser()
    else:
        raise WeightsError(f"--weights {spec!r} is not a registry name, an http(s) URL or an existing file; "
                           f"registry names: {', '.join(registry_names())}")
    checkpoint = _checkpoint_from(_load_file(path), path, spec, arch, entry)
    if checkpoint.arch not in KNOWN_ARCHS:  # a newer segcli's checkpoint, or a bad registry entry
        raise WeightsError(f"{path} needs architecture {checkpoint.arch!r}, which this segcli does not have")
    return checkpoint


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], arch: str, categories: list[dict],
                    label_to_category_id: list[int], meta: dict, extra: dict | None = None) -> None:
    """Write a self-describing segcli checkpoint atomically; `extra` keys (optimizer state...) are ignored on load."""
    if arch not in KNOWN_ARCHS:
        raise ValueError(f"unknown arch {arch!r}")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": arch,
               "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories],
               "label_to_category_id": [int(i) for i in label_to_category_id], "meta": dict(meta), "model": state_dict}
    if clash := set(payload) & set(extra or {}):
        raise ValueError(f"extra keys would overwrite checkpoint fields: {sorted(clash)}")
    with atomic_write(path, "wb") as handle:
        torch.save({**payload, **(extra or {})}, handle)
