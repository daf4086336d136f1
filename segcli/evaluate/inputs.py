"""The inputs of `segcli eval`: a ground truth pycocotools can score against, and predictions turned
into the results list `COCO.loadRes` takes, matched to the ground truth's images and categories.

pycocotools itself does the scoring (the numbers must be its numbers). What it does not do, and
what this module does, is take the files users actually have: the COCO dataset file `segcli
predict` writes (its own image ids, `file_name` relative to the source folder), bare results lists,
polygon or uncompressed-RLE masks, ground truth from annotation tools with missing fields. Whatever
cannot be scored is reported as a warning and left out; whatever makes the whole run meaningless
is a `UsageError`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segcli.data.coco import polygon_readable, rle_readable
from segcli.errors import UsageError

MAX_NAMED = 5  # how many examples a warning names before it says "..."


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
    if not _is_records(records):
        raise UsageError(f"{where}: JSON Lines, but not segcli predict records (file, width, height, instances)")
    return records


def _is_records(data: Any) -> bool:
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
            if "category_name" in instance and _is_int(instance.get("category_id")):
                categories.setdefault(instance["category_id"], str(instance["category_name"]))
            annotations.append({**instance, "image_id": image_id})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": cid, "name": name} for cid, name in sorted(categories.items())]}


# ---------------------------------------------------------------------------------------------
# Ground truth


@dataclass
class GroundTruth:
    coco: COCO
    warnings: list[str] = field(default_factory=list)
    has_masks: bool = True  # every annotation has a segmentation (segm evaluation can run)


def load_ground_truth(path: str | Path, flag: str = "--gt") -> GroundTruth:
    """Read a COCO dataset file and make it safe for pycocotools, or raise UsageError.

    Repairs (each reported): a missing `iscrowd` becomes 0, a missing `area` the mask area (the
    box area without a mask), a missing `bbox` the mask's box; annotation ids that are missing,
    repeated or not positive are renumbered 1..N, because pycocotools keys annotations by id and
    records a match as the matched id (a repeated id evaluates one annotation twice, an id of 0
    counts its match as a miss). A valid file is used unchanged, so the numbers are exactly those of
    pycocotools run by hand on it.
    """
    return ground_truth_from_dataset(read_json(path, flag), f"{flag} {path}")


def ground_truth_from_dataset(data: Any, where: str = "ground truth") -> GroundTruth:
    if isinstance(data, list):
        raise UsageError(f"{where}: a results list, not a COCO dataset (it needs images, categories and annotations)")
    if not isinstance(data, dict):
        raise UsageError(f"{where}: not a COCO dataset (a JSON object with images, categories and annotations)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UsageError(f"{where}: not a COCO dataset: no {key!r} list")
    warnings: list[str] = []
    images = data["images"]
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise UsageError(f"{where}: images[{index}] has no integer id")
        if not (_is_int(image.get("width")) and _is_int(image.get("height"))
                and image["width"] > 0 and image["height"] > 0):
            raise UsageError(f"{where}: image {image['id']} has no positive integer width and height")
    _no_duplicates([image["id"] for image in images], f"{where}: image id")
    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            raise UsageError(f"{where}: categories[{index}] has no integer id")
    _no_duplicates([category["id"] for category in data["categories"]], f"{where}: category id")
    if not data["categories"]:
        raise UsageError(f"{where}: no categories")

    sizes = {image["id"]: (image["height"], image["width"]) for image in images}
    category_ids = {category["id"] for category in data["categories"]}
    repaired: Counter = Counter()
    unknown_images: list = []
    unknown_categories: set = set()
    has_masks = True
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")) or not _is_int(ann.get("category_id")):
            raise UsageError(f"{where}: annotations[{index}] has no integer image_id and category_id")
        if ann["image_id"] not in sizes:
            unknown_images.append(ann.get("id", f"#{index}"))
            continue  # pycocotools never looks at it: evaluation runs over the images listed
        if ann["category_id"] not in category_ids:
            unknown_categories.add(ann["category_id"])
        height, width = sizes[ann["image_id"]]
        label = f"{where}: annotation {ann.get('id', f'#{index}')}"
        if ann.get("segmentation") is None:
            has_masks = False
        elif not _plain_mask(ann["segmentation"], height, width, label):
            # Empty or broken outlines make pycocotools fail; what is left of them is the mask.
            ann["segmentation"] = _mask_rle(ann["segmentation"], height, width, label)
            repaired["segmentation"] += 1
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            repaired["iscrowd"] += 1
        if not _is_box(ann.get("bbox")):
            if ann.get("segmentation") is None:
                raise UsageError(f"{label} has neither a bbox nor a segmentation")
            ann["bbox"] = [float(v) for v in mask_utils.toBbox(_mask_rle(ann["segmentation"], height, width, label))]
            repaired["bbox"] += 1
        if not _is_number(ann.get("area")):
            x, y, w, h = ann["bbox"]
            ann["area"] = (float(w * h) if ann.get("segmentation") is None
                           else float(mask_utils.area(_mask_rle(ann["segmentation"], height, width, label))))
            repaired["area"] += 1
    if unknown_images:
        warnings.append(f"{where}: {len(unknown_images)} annotations of images not listed in 'images' ignored "
                        f"(ids {_some(unknown_images)})")
    if unknown_categories:
        warnings.append(f"{where}: annotations of category ids {_some(sorted(unknown_categories))} not listed in "
                        f"'categories' are not scored")
    for key, count in sorted(repaired.items()):
        what = {"iscrowd": "have no iscrowd; taken as 0", "bbox": "have no bbox; taken from the mask",
                "area": "have no area; taken from the mask",
                "segmentation": "have empty or degenerate polygons; scored as what is left of their mask"}[key]
        warnings.append(f"{where}: {count} annotations {what}")
    ids = [ann.get("id") for ann in data["annotations"]]
    if not all(_is_int(i) and i > 0 for i in ids) or len(set(ids)) != len(ids):
        for number, ann in enumerate(data["annotations"], start=1):
            ann["id"] = number
        warnings.append(f"{where}: annotation ids are missing, repeated or not positive; renumbered 1..N "
                        "(pycocotools would mis-score them as they are)")
    coco = COCO()
    coco.dataset = data
    with pycocotools_output(quiet=True):
        coco.createIndex()
    return GroundTruth(coco, warnings, has_masks)


def _plain_mask(segmentation: Any, height: int, width: int, label: str) -> bool:
    """True for a mask pycocotools reads as it is (checked by shape, without decoding it): polygons
    of at least 3 points, or RLE of the image's size. False for outlines it cannot read (empty,
    fewer than 3 points). UsageError for anything that is not a mask at all."""
    if isinstance(segmentation, list):
        # Coordinates are checked too: pycocotools crashes the process on NaN or None in a
        # polygon, and runs out of memory on huge ones (see polygon_readable).
        return bool(segmentation) and all(polygon_readable(p, height, width) for p in segmentation)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if _rle_size(segmentation) != [height, width]:
            raise UsageError(f"{label}: mask size {segmentation['size']!r} is not its image's [{height}, {width}]")
        # pycocotools would fail on such counts only when COCOeval reads them: say it now.
        if not rle_readable(segmentation, height, width):
            raise UsageError(f"{label}: malformed RLE (counts are not run lengths that fill its "
                             f"{height}x{width} image)")
        return True
    raise UsageError(f"{label}: segmentation is neither polygons nor RLE")


def _mask_rle(segmentation: Any, height: int, width: int, label: str) -> dict:
    """Any polygon or RLE mask as one compressed RLE; outlines of fewer than 3 points are dropped."""
    try:
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if polygon_readable(p, height, width)]
            if not polygons:
                return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
            return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
            return {"size": [height, width], "counts": segmentation["counts"]}
    except Exception as error:  # pycocotools raises bare Exceptions and TypeErrors on malformed masks
        raise UsageError(f"{label}: unreadable segmentation ({error})")
    raise UsageError(f"{label}: segmentation is neither polygons nor RLE")


# ---------------------------------------------------------------------------------------------
# Predictions


@dataclass
class Results:
    """Predictions as `COCO.loadRes` takes them, plus what was left out and why."""

    results: list[dict]
    warnings: list[str] = field(default_factory=list)
    has_masks: bool = True  # every result has a segmentation (segm evaluation can run)
    without_masks: int = 0
    matched_images: int = 0  # prediction images paired with a ground-truth image
    prediction_images: int = 0  # images the predictions mention
    missed_images: int = 0  # ground-truth images no prediction image was paired with


def load_results(gt: COCO, predictions: str | Path | list | dict, flag: str = "--pred",
                 where: str | None = None) -> Results:
    """Predictions (a path, or the parsed JSON) matched to `gt`.

    A COCO dataset file (what `segcli predict` writes): its images are paired with the ground
    truth's by `file_name` (the exact path, else the base name where it is unambiguous on both
    sides); only when no file name pairs at all, by image id. Its categories are paired by id, or
    by name where the names say the ids differ. A bare results list (`--format coco-results`, or
    any `[{"image_id", "category_id", "score", "bbox", "segmentation"}]`) uses the ground truth's
    image and category ids as they are. JSON Lines records (`segcli predict`'s stream, one image
    per line) are paired like a COCO file's images. Raises UsageError for a file that is not
    predictions at all, or whose predictions all belong to images the ground truth does not have.
    """
    if where is None:
        where = f"{flag} {predictions}" if isinstance(predictions, (str, Path)) else "predictions"
    data = read_predictions(predictions, flag) if isinstance(predictions, (str, Path)) else predictions
    if _is_records(data):
        data = records_to_dataset(data)
    warnings: list[str] = []
    if isinstance(data, list):
        annotations, image_map, category_map = data, None, None
        mentioned = {a.get("image_id") for a in data if isinstance(a, dict)}
    elif isinstance(data, dict) and isinstance(data.get("annotations"), list):
        annotations = data["annotations"]
        image_map = category_map = None
        if isinstance(data.get("images"), list):
            image_map = _match_images(gt, data["images"], where, warnings)
            mentioned = {image.get("id") for image in data["images"] if isinstance(image, dict)}
        else:
            mentioned = {a.get("image_id") for a in annotations if isinstance(a, dict)}
        if isinstance(data.get("categories"), list):
            category_map = _match_categories(gt, data["categories"], where, warnings)
    else:
        raise UsageError(f"{where}: not predictions (a COCO file with 'annotations', or a results list)")

    results = normalize_results(gt, annotations, where, warnings, image_map, category_map)
    gt_images = set(gt.getImgIds())
    if image_map is not None:
        matched = set(image_map.values())
        results.matched_images = len(matched)
    else:
        matched = {a.get("image_id") for a in annotations if isinstance(a, dict)} & gt_images
        results.matched_images = len(matched)
    results.prediction_images = len(mentioned)
    results.missed_images = len(gt_images - matched)
    if results.prediction_images and not results.matched_images:
        raise UsageError(f"{where}: no image in the predictions is in the ground truth "
                         "(compare their file_name and id fields)")
    results.warnings[:0] = warnings
    return results


def normalize_results(gt: COCO, annotations: list, where: str = "predictions", warnings: list[str] | None = None,
                      image_map: dict | None = None, category_map: dict | None = None) -> Results:
    """Check every prediction and rewrite it for `COCO.loadRes`: ground-truth image and category
    ids, polygon and uncompressed-RLE masks as compressed RLE (decoded against the ground-truth
    image's size, as pycocotools' `annToRLE` does). Predictions of unknown images or categories
    are left out and reported; a missing score or a malformed box or mask is a UsageError.
    Inputs are not modified (loadRes writes into the dicts it gets, so these are new ones)."""
    warnings = [] if warnings is None else warnings
    sizes = {image_id: (image["height"], image["width"]) for image_id, image in gt.imgs.items()}
    known_categories = set(gt.getCatIds())
    out: list[dict] = []
    unknown_images: Counter = Counter()
    unknown_categories: Counter = Counter()
    wrong_size: Counter = Counter()
    without_masks = 0
    any_box = False
    for index, ann in enumerate(annotations):
        label = f"{where}: prediction #{index}"
        if not isinstance(ann, dict):
            raise UsageError(f"{label} is not a JSON object")
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if not _is_int(image_id) or not _is_int(category_id):
            raise UsageError(f"{label} has no integer image_id and category_id")
        if image_map is not None:
            if image_id not in image_map:
                unknown_images[image_id] += 1
                continue
            image_id = image_map[image_id]
        elif image_id not in sizes:
            unknown_images[image_id] += 1
            continue
        if category_map is not None and category_id in category_map:
            category_id = category_map[category_id]  # None: a name the ground truth does not have
        if category_id not in known_categories:
            unknown_categories[ann["category_id"]] += 1
            continue
        score = ann.get("score")
        if not _is_number(score) or not math.isfinite(score):
            raise UsageError(f"{label} has no numeric score (ground-truth annotations are not predictions)")
        # Plain Python numbers (exact conversions): JSON values pass through unchanged.
        result = {"image_id": int(image_id), "category_id": int(category_id), "score": _plain_number(score)}
        box = ann.get("bbox")
        if box is not None and not (isinstance(box, (list, tuple, np.ndarray)) and len(box) == 0):
            if not _is_box(box):
                raise UsageError(f"{label}: bbox must be [x, y, width, height] numbers, got {box!r}")
            result["bbox"] = [_plain_number(v) for v in box]
            any_box = True
        height, width = sizes[image_id]
        rle = _prediction_rle(ann.get("segmentation"), height, width, label)
        if rle == "wrong size":
            wrong_size[image_id] += 1
            continue
        if rle is None:
            without_masks += 1
            if "bbox" not in result:
                raise UsageError(f"{label} has neither a bbox nor a segmentation")
        else:
            result["segmentation"] = rle
        out.append(result)
    if any_box:
        # loadRes decides from the first result alone whether results carry boxes; one without
        # would then fail. Its box is the mask's box, what loadRes gives results that have no bbox.
        for result in out:
            if "bbox" not in result:
                result["bbox"] = [float(v) for v in mask_utils.toBbox(result["segmentation"])]
    if unknown_images:
        warnings.append(f"{where}: {sum(unknown_images.values())} predictions for {len(unknown_images)} images "
                        f"not in the ground truth ignored (image ids {_some(sorted(unknown_images))})")
    if unknown_categories:
        warnings.append(f"{where}: {sum(unknown_categories.values())} predictions of category ids "
                        f"{_some(sorted(unknown_categories))} not in the ground truth ignored")
    if wrong_size:
        warnings.append(f"{where}: {sum(wrong_size.values())} predictions whose mask size differs from their "
                        f"ground-truth image ignored (image ids {_some(sorted(wrong_size))})")
    return Results(out, warnings, has_masks=without_masks == 0, without_masks=without_masks)


def _prediction_rle(segmentation: Any, height: int, width: int, label: str) -> dict | str | None:
    if segmentation is None:
        return None
    if isinstance(segmentation, dict) and "size" in segmentation and _rle_size(segmentation) != [height, width]:
        return "wrong size"
    # An empty or degenerate outline is still a detection: one with an empty mask.
    return _mask_rle(segmentation, height, width, label)


def _rle_size(segmentation: dict) -> Any:
    """An RLE's `size` as a list to compare with [height, width]; whatever else a file holds there
    (a number, null: `list()` of it would raise) as it is, which compares unequal."""
    size = segmentation["size"]
    return list(size) if isinstance(size, (list, tuple)) else size


def _match_images(gt: COCO, images: list, where: str, warnings: list[str]) -> dict[int, int]:
    """Map prediction image ids to ground-truth image ids by file name, else (no name pairs) by id."""
    gt_by_name = _unique_index((_normal(image.get("file_name")), image_id) for image_id, image in gt.imgs.items())
    gt_by_base = _unique_index((_base(image.get("file_name")), image_id) for image_id, image in gt.imgs.items())
    predicted = [image for image in images if isinstance(image, dict) and _is_int(image.get("id"))]
    base_counts = Counter(_base(image.get("file_name")) for image in predicted)
    mapping: dict[int, int] = {}
    unmatched: list[str] = []
    for image in predicted:
        name = _normal(image.get("file_name"))
        target = gt_by_name.get(name)
        if target is None and base_counts[_base(name)] == 1:
            target = gt_by_base.get(_base(name))
        if target is None:
            unmatched.append(str(image.get("file_name", image["id"])))
        else:
            mapping[image["id"]] = target
    if not mapping and predicted:
        # No file name pairs up (renamed images, names left out): fall back to ids, as the
        # images of a dataset file made from the same id list would pair.
        mapping = {image["id"]: image["id"] for image in predicted if image["id"] in gt.imgs}
        unmatched = [str(image.get("file_name", image["id"])) for image in predicted if image["id"] not in gt.imgs]
        if mapping:
            warnings.append(f"{where}: no file_name matches the ground truth; images are paired by id")
    # A prediction image of another size is another image, whatever its name says.
    sized = {image["id"]: image for image in predicted}
    for pred_id, gt_id in list(mapping.items()):
        image, truth = sized[pred_id], gt.imgs[gt_id]
        if _is_int(image.get("width")) and _is_int(image.get("height")) and (
                image["width"], image["height"]) != (truth["width"], truth["height"]):
            del mapping[pred_id]
            unmatched.append(f"{image.get('file_name', pred_id)} ({image['width']}x{image['height']}, the ground "
                             f"truth's is {truth['width']}x{truth['height']})")
    claimed: dict[int, int] = {}
    for pred_id in sorted(mapping):
        if mapping[pred_id] in claimed:
            unmatched.append(f"{sized[pred_id].get('file_name', pred_id)} (a second prediction for ground-truth image "
                             f"{mapping[pred_id]})")
            del mapping[pred_id]
        else:
            claimed[mapping[pred_id]] = pred_id
    if unmatched:
        warnings.append(f"{where}: {len(unmatched)} predicted images not in the ground truth ignored: "
                        f"{_some(unmatched)}")
    return mapping


def _match_categories(gt: COCO, categories: list, where: str, warnings: list[str]) -> dict[int, int | None]:
    """Map prediction category ids to the ground truth's: by id while the names agree, else by name.

    A fine-tuned checkpoint writes the dataset's own ids, so ids normally agree. Where the names
    say otherwise and some names are shared (the same classes numbered differently), names decide
    and a name the ground truth lacks maps to None (reported as unknown). Where no name is shared
    the ids are all there is to go by; that is warned about.
    """
    predicted = {c["id"]: str(c.get("name", "")) for c in categories if isinstance(c, dict) and _is_int(c.get("id"))}
    gt_names = {cid: str(c.get("name", "")) for cid, c in gt.cats.items()}
    conflicts = [cid for cid, name in predicted.items() if name and gt_names.get(cid, "").lower() != name.lower()]
    if not conflicts:
        return {}
    by_name = _unique_index((name.lower(), cid) for cid, name in gt_names.items())
    renamed = {cid: by_name.get(name.lower()) for cid, name in predicted.items()}
    if any(renamed[cid] is not None for cid in conflicts):
        moved = [f"{predicted[c]} {c}->{t}" for c, t in sorted(renamed.items()) if t is not None and t != c]
        warnings.append(f"{where}: category ids differ from the ground truth's; paired by name ({_some(moved)})")
        return renamed
    clash = [cid for cid in conflicts if cid in gt_names]
    if clash:
        warnings.append(f"{where}: no category name matches the ground truth's (e.g. id {clash[0]} is "
                        f"{predicted[clash[0]]!r} here and {gt_names[clash[0]]!r} there); paired by id")
    return {}


def _unique_index(pairs) -> dict:
    index: dict = {}
    seen: Counter = Counter()
    for key, value in pairs:
        if key is None:
            continue
        seen[key] += 1
        index[key] = value
    return {key: value for key, value in index.items() if seen[key] == 1}


def _normal(name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return None
    name = posixpath.normpath(name.replace("\\", "/"))
    return name[2:] if name.startswith("./") else name


def _base(name: Any) -> str | None:
    name = _normal(name)
    return posixpath.basename(name) if name else None


def _no_duplicates(values: list, what: str) -> None:
    repeated = [value for value, count in Counter(values).items() if count > 1]
    if repeated:
        raise UsageError(f"{what}s repeat: {_some(sorted(repeated))}")


def _some(values: list) -> str:
    shown = ", ".join(str(v) for v in values[:MAX_NAMED])
    return shown + (", ..." if len(values) > MAX_NAMED else "")


# numpy scalars count: a trainer's in-memory results are often built from arrays.
def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _plain_number(value: Any) -> int | float:
    return value.item() if isinstance(value, np.generic) else value


def _is_box(value: Any) -> bool:
    return (isinstance(value, (list, tuple, np.ndarray)) and len(value) == 4
            and all(_is_number(v) and math.isfinite(v) for v in value))
