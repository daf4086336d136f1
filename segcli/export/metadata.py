"""What travels inside an exported file: categories, architecture and detection settings.

Stored as one JSON document: a TorchScript archive's extra file `segcli.json`, or the ONNX
model's `metadata_props` entry `segcli`. The runtime reads it back to name categories, apply
`--score-thr`/`--max-det` on top of the export's own threshold, and pad inputs to fixed sizes.
"""

from __future__ import annotations

import hashlib
import json

from segcli.errors import WeightsError

FORMAT = "segcli-export"
VERSION = 1
KEY = "segcli"  # ONNX metadata key; TorchScript extra file is KEY + ".json"
MASKS = "28x28 probabilities inside each box (paste with the box; threshold 0.5)"
REQUIRED = ("arch", "categories", "label_to_category_id", "score_threshold", "max_detections", "min_size", "max_size")


def parse_metadata(text: str | None, where: str) -> dict:
    """The metadata of an exported file, checked; a missing or foreign document is a WeightsError."""
    if not text:
        raise WeightsError(f"{where} has no segcli metadata: export it with `segcli export`")
    try:
        meta = json.loads(text)
    except ValueError:
        raise WeightsError(f"{where}: its segcli metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightsError(f"{where} was not written by `segcli export`")
    if meta.get("version") != VERSION:
        raise WeightsError(f"{where} is a version {meta.get('version')} segcli export; this segcli reads {VERSION}")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise WeightsError(f"{where}: its segcli metadata lacks {', '.join(missing)}")
    return meta


def graph_digest(model) -> str:
    """sha256 of an ONNX model's graph (weights and nodes; not its metadata, which records the
    digest): what `segcli quantize` stores as `graph_sha256` and predict checks."""
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()
