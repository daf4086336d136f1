"""Predictions for `segcli eval`: a COCO file `segcli predict` wrote, a bare results list or JSON
Lines records, turned into the results list `COCO.loadRes` takes, their images and categories
paired with the ground truth's. What cannot be scored is a warning; a file that is not
predictions of this ground truth at all is a `UsageError`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import math

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segcli.errors import UsageError
from segcli.evaluate.checks import (base_name, is_box, is_int, is_number, normal_name, plain_number, some,
                                    unique_index)
from segcli.evaluate.inputs import is_records, read_predictions, records_to_dataset
from segcli.evaluate.masks import mask_rle, rle_size

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
    if is_records(data):
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
        if not is_int(image_id) or not is_int(category_id):
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
        if not is_number(score) or not math.isfinite(score):
            raise UsageError(f"{label} has no numeric score (ground-truth annotations are not predictions)")
        # Plain Python numbers (exact conversions): JSON values pass through unchanged.
        result = {"image_id": int(image_id), "category_id": int(category_id), "score": plain_number(score)}
        box = ann.get("bbox")
        if box is not None and not (isinstance(box, (list, tuple, np.ndarray)) and len(box) == 0):
            if not is_box(box):
                raise UsageError(f"{label}: bbox must be [x, y, width, height] numbers, got {box!r}")
            result["bbox"] = [plain_number(v) for v in box]
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
                        f"not in the ground truth ignored (image ids {some(sorted(unknown_images))})")
    if unknown_categories:
        warnings.append(f"{where}: {sum(unknown_categories.values())} predictions of category ids "
                        f"{some(sorted(unknown_categories))} not in the ground truth ignored")
    if wrong_size:
        warnings.append(f"{where}: {sum(wrong_size.values())} predictions whose mask size differs from their "
                        f"ground-truth image ignored (image ids {some(sorted(wrong_size))})")
    return Results(out, warnings, has_masks=without_masks == 0, without_masks=without_masks)


def _prediction_rle(segmentation: Any, height: int, width: int, label: str) -> dict | str | None:
    if segmentation is None:
        return None
    if isinstance(segmentation, dict) and "size" in segmentation and rle_size(segmentation) != [height, width]:
        return "wrong size"
    # An empty or degenerate outline is still a detection: one with an empty mask.
    return mask_rle(segmentation, height, width, label)



def _match_images(gt: COCO, images: list, where: str, warnings: list[str]) -> dict[int, int]:
    """Map prediction image ids to ground-truth image ids by file name, else (no name pairs) by id."""
    gt_by_name = unique_index((normal_name(image.get("file_name")), image_id) for image_id, image in gt.imgs.items())
    gt_by_base = unique_index((base_name(image.get("file_name")), image_id) for image_id, image in gt.imgs.items())
    predicted = [image for image in images if isinstance(image, dict) and is_int(image.get("id"))]
    base_counts = Counter(base_name(image.get("file_name")) for image in predicted)
    mapping: dict[int, int] = {}
    unmatched: list[str] = []
    for image in predicted:
        name = normal_name(image.get("file_name"))
        target = gt_by_name.get(name)
        if target is None and base_counts[base_name(name)] == 1:
            target = gt_by_base.get(base_name(name))
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
        if is_int(image.get("width")) and is_int(image.get("height")) and (
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
                        f"{some(unmatched)}")
    return mapping


def _match_categories(gt: COCO, categories: list, where: str, warnings: list[str]) -> dict[int, int | None]:
    """Map prediction category ids to the ground truth's: by id while the names agree, else by name.

    A fine-tuned checkpoint writes the dataset's own ids, so ids normally agree. Where the names
    say otherwise and some names are shared (the same classes numbered differently), names decide
    and a name the ground truth lacks maps to None (reported as unknown). Where no name is shared
    the ids are all there is to go by; that is warned about.
    """
    predicted = {c["id"]: str(c.get("name", "")) for c in categories if isinstance(c, dict) and is_int(c.get("id"))}
    gt_names = {cid: str(c.get("name", "")) for cid, c in gt.cats.items()}
    conflicts = [cid for cid, name in predicted.items() if name and gt_names.get(cid, "").lower() != name.lower()]
    if not conflicts:
        return {}
    by_name = unique_index((name.lower(), cid) for cid, name in gt_names.items())
    renamed = {cid: by_name.get(name.lower()) for cid, name in predicted.items()}
    if any(renamed[cid] is not None for cid in conflicts):
        moved = [f"{predicted[c]} {c}->{t}" for c, t in sorted(renamed.items()) if t is not None and t != c]
        warnings.append(f"{where}: category ids differ from the ground truth's; paired by name ({some(moved)})")
        return renamed
    clash = [cid for cid in conflicts if cid in gt_names]
    if clash:
        warnings.append(f"{where}: no category name matches the ground truth's (e.g. id {clash[0]} is "
                        f"{predicted[clash[0]]!r} here and {gt_names[clash[0]]!r} there); paired by id")
    return {}

