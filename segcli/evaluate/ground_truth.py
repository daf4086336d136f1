"""Ground truth for `segcli eval` (and train's validation): a COCO dataset file checked and
repaired so that pycocotools scores it as it is meant, or a `UsageError` saying why it cannot be."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segcli.errors import UsageError
from segcli.evaluate.checks import is_box, is_int, is_number, no_duplicates, some
from segcli.evaluate.inputs import pycocotools_output, read_json
from segcli.evaluate.masks import mask_rle, plain_mask


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
        if not isinstance(image, dict) or not is_int(image.get("id")):
            raise UsageError(f"{where}: images[{index}] has no integer id")
        if not (is_int(image.get("width")) and is_int(image.get("height"))
                and image["width"] > 0 and image["height"] > 0):
            raise UsageError(f"{where}: image {image['id']} has no positive integer width and height")
    no_duplicates([image["id"] for image in images], f"{where}: image id")
    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not is_int(category.get("id")):
            raise UsageError(f"{where}: categories[{index}] has no integer id")
    no_duplicates([category["id"] for category in data["categories"]], f"{where}: category id")
    if not data["categories"]:
        raise UsageError(f"{where}: no categories")

    sizes = {image["id"]: (image["height"], image["width"]) for image in images}
    category_ids = {category["id"] for category in data["categories"]}
    repaired: Counter = Counter()
    unknown_images: list = []
    unknown_categories: set = set()
    has_masks = True
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not is_int(ann.get("image_id")) or not is_int(ann.get("category_id")):
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
        elif not plain_mask(ann["segmentation"], height, width, label):
            # Empty or broken outlines make pycocotools fail; what is left of them is the mask.
            ann["segmentation"] = mask_rle(ann["segmentation"], height, width, label)
            repaired["segmentation"] += 1
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            repaired["iscrowd"] += 1
        if not is_box(ann.get("bbox")):
            if ann.get("segmentation") is None:
                raise UsageError(f"{label} has neither a bbox nor a segmentation")
            ann["bbox"] = [float(v) for v in mask_utils.toBbox(mask_rle(ann["segmentation"], height, width, label))]
            repaired["bbox"] += 1
        if not is_number(ann.get("area")):
            x, y, w, h = ann["bbox"]
            ann["area"] = (float(w * h) if ann.get("segmentation") is None
                           else float(mask_utils.area(mask_rle(ann["segmentation"], height, width, label))))
            repaired["area"] += 1
    if unknown_images:
        warnings.append(f"{where}: {len(unknown_images)} annotations of images not listed in 'images' ignored "
                        f"(ids {some(unknown_images)})")
    if unknown_categories:
        warnings.append(f"{where}: annotations of category ids {some(sorted(unknown_categories))} not listed in "
                        f"'categories' are not scored")
    for key, count in sorted(repaired.items()):
        what = {"iscrowd": "have no iscrowd; taken as 0", "bbox": "have no bbox; taken from the mask",
                "area": "have no area; taken from the mask",
                "segmentation": "have empty or degenerate polygons; scored as what is left of their mask"}[key]
        warnings.append(f"{where}: {count} annotations {what}")
    ids = [ann.get("id") for ann in data["annotations"]]
    if not all(is_int(i) and i > 0 for i in ids) or len(set(ids)) != len(ids):
        for number, ann in enumerate(data["annotations"], start=1):
            ann["id"] = number
        warnings.append(f"{where}: annotation ids are missing, repeated or not positive; renumbered 1..N "
                        "(pycocotools would mis-score them as they are)")
    coco = COCO()
    coco.dataset = data
    with pycocotools_output(quiet=True):
        coco.createIndex()
    return GroundTruth(coco, warnings, has_masks)

