"""The inputs of `segcli eval`: a ground truth pycocotools can score against, and predictions turned
into the results list `COCO.loadRes` takes, matched to the ground truth's images and categories.

pycocotools itself does the scoring (the numbers must be its numbers). What it does not do, and
what these modules do, is take the files users actually have: the COCO dataset file `segcli
predict` writes (its own image ids, `file_name` relative to the source folder), bare results lists,
polygon or uncompressed-RLE masks, ground truth from annotation tools with missing fields. Whatever
cannot be scored is reported as a warning and left out; whatever makes the whole run meaningless
is a `UsageError`.

This module reads the files; ground_truth.py checks a dataset, results.py pairs predictions with
it, masks.py and checks.py hold what both share.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Iterator

from segcli.errors import UsageError
from segcli.evaluate.checks import is_int


@contextlib.contextmanager
def pycocotools_output(quiet: bool, stderr: Any = None) -> Iterator[None]:
    """pycocotools prints progress to stdout; stdout carries segcli's data, so send it elsewhere."""
    import sys

    target = io.StringIO() if quiet else (stderr or sys.stderr)
    with contextlib.redirect_stdout(target):
        yield


def read_json(path: str | Path, flag: str) -> Any:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder, not a JSON file")
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UsageError(f"{flag} {path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})")
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not valid JSON (not UTF-8 text)")
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot read ({error.strerror})")


def read_predictions(path: str | Path, flag: str, stdin: Any = None) -> Any:
    """A predictions file (`-`: stdin): JSON (a COCO file or a results list), or JSON Lines
    (`segcli predict`'s stream: one record per image, `{"file", "frame", "width", "height",
    "instances"}`), told apart by content, not by name."""
    import sys

    if str(path) == "-":
        where = f"{flag} - (stdin)"
        content = (stdin or sys.stdin.buffer).read()
    else:
        path = Path(path)
        where = f"{flag} {path}"
        if not path.exists():
            raise UsageError(f"{where}: no such file")
        if path.is_dir():
            raise UsageError(f"{where}: is a folder, not a JSON file")
        try:
            content = path.read_bytes()
        except OSError as error:
            raise UsageError(f"{where}: cannot read ({error.strerror})")
    if not content.strip():
        raise UsageError(f"{where}: empty")
    try:
        return json.loads(content)
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not valid JSON (not UTF-8 text)")
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":  # a second JSON value after the first: JSON Lines
            raise UsageError(f"{where}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})")
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UsageError(f"{where}: line {number} is not valid JSON ({error.msg})")
    if not is_records(records):
        raise UsageError(f"{where}: JSON Lines, but not segcli predict records (file, width, height, instances)")
    return records


def is_records(data: Any) -> bool:
    if isinstance(data, dict):
        return "instances" in data and "file" in data
    return (isinstance(data, list) and bool(data)
            and all(isinstance(r, dict) and "instances" in r and "file" in r for r in data))


def records_to_dataset(records: Any) -> dict:
    """JSON Lines records as the COCO dataset file `segcli predict` would have written for them.

    A video frame's `file_name` is `clip.mp4#FRAME`, as segcli's COCO output names it."""
    records = [records] if isinstance(records, dict) else records
    images, annotations, categories = [], [], {}
    for image_id, record in enumerate(records, start=1):
        name = record["file"] if record.get("frame") is None else f"{record['file']}#{record['frame']}"
        images.append({"id": image_id, "file_name": name, "width": record.get("width"), "height": record.get("height")})
        for instance in record.get("instances") or []:
            if not isinstance(instance, dict):
                continue
            if "category_name" in instance and is_int(instance.get("category_id")):
                categories.setdefault(instance["category_id"], str(instance["category_name"]))
            annotations.append({**instance, "image_id": image_id})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": cid, "name": name} for cid, name in sorted(categories.items())]}
