"""Read a COCO instance-segmentation file for training, validating it up front.

Annotation tools export messy files. Everything that can be checked without decoding pixels is
checked here, before the first epoch, and reported with image and annotation ids:

- fatal (one clear error): not JSON, not a COCO object, no categories, duplicate category ids, no
  usable image;
- skipped with a warning: duplicate image or annotation ids, `file_name` missing, absolute or
  escaping the images folder (`..`), image files that do not exist, annotations of unknown images
  or categories, boxes outside the image (clipped; dropped when nothing is left), degenerate
  polygons (fewer than 3 points, zero area), RLEs of the wrong size, annotations without a
  segmentation.

Crowd regions (`iscrowd: 1`) are not targets, as in torchvision's and Detectron2's training.
Images without (usable) annotations stay in the set as negatives. Category ids, which need not be
contiguous, map to labels 1..K in increasing id order (0 is the background) and back through
`label_to_category_id`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segcli.errors import UsageError
from segcli.ops.rle_crops import rle_counts

EXIF_ORIENTATION = 0x0112
MIN_BOX_SIDE = 1.0  # pixels; thinner boxes have no defined regression target


@dataclass
class Instance:
    annotation_id: int
    label: int  # contiguous, 1..K
    box: tuple[float, float, float, float]  # xyxy, clipped to the image
    segmentation: list | dict  # COCO polygons or RLE, validated


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    file_name: str
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)


@dataclass
class CocoDataset:
    """A validated COCO file: its images (with usable instances) and the label mapping."""

    source: Path
    images: list[ImageRecord]
    categories: list[dict]  # {"id", "name"} in label order
    warnings: list[str]
    crowd_ignored: int = 0

    @property
    def label_to_category_id(self) -> list[int]:
        return [0] + [c["id"] for c in self.categories]

    @property
    def num_classes(self) -> int:
        """Labels including the background."""
        return len(self.categories) + 1

    def summary(self) -> str:
        instances = sum(len(r.instances) for r in self.images)
        negatives = sum(not r.instances for r in self.images)
        return (f"{self.source}: {len(self.images)} images ({negatives} without objects), {instances} instances, "
                f"{len(self.categories)} categories; {len(self.warnings)} problems skipped, "
                f"{self.crowd_ignored} crowd regions ignored")


def _fatal(path: Path, message: str) -> UsageError:
    return UsageError(f"{path}: {message}")


def load_json(path: Path) -> dict:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"COCO file not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read COCO file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fatal(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise _fatal(path, "not a COCO annotation file (expected an object with an 'images' list)")
    return data


def safe_image_path(images_dir: Path, file_name: object) -> Path | None:
    """The image's path inside `images_dir`, or None when `file_name` is not a relative path that
    stays inside it (absolute paths and `..` would read files the dataset does not own)."""
    if not isinstance(file_name, str) or not file_name.strip():
        return None
    relative = Path(file_name.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or relative.drive:
        return None
    return images_dir / relative


def load_categories(path: Path, data: dict) -> list[dict]:
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise _fatal(path, "has no 'categories'; training needs at least one")
    seen: dict[int, str] = {}
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or isinstance(category.get("id"), bool):
            raise _fatal(path, f"category #{index} has no integer 'id'")
        if category["id"] in seen:
            raise _fatal(path, f"category id {category['id']} appears twice ({seen[category['id']]!r} and "
                               f"{category.get('name')!r})")
        if category["id"] <= 0:
            raise _fatal(path, f"category id {category['id']} must be positive (0 is the background)")
        seen[category["id"]] = str(category.get("name", f"class_{category['id']}"))
    return [{"id": cid, "name": seen[cid]} for cid in sorted(seen)]


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


POLYGON_REACH = 4  # polygon coordinates may lie this many image sizes outside the image, no more


def polygon_readable(points: object, height: int, width: int) -> bool:
    """Whether pycocotools can rasterize `points` ([x1, y1, x2, y2, ...]) safely: at least 3
    points of finite numbers near the image. pycocotools' polygon rasterizer crashes the process on
    NaN or None coordinates (a segmentation fault) and allocates memory in proportion to the
    outline's length, so a single coordinate of 1e12 ends in the kernel's out-of-memory kill."""
    if not (isinstance(points, list) and len(points) >= 6 and len(points) % 2 == 0):
        return False
    reach = POLYGON_REACH * max(height, width, 1)
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and -reach <= v <= reach
               for v in points)


def rle_readable(segmentation: dict, height: int, width: int) -> bool:
    """Whether an RLE's `counts` (a compressed string, or a list of run lengths) are runs that
    fill exactly a `height` x `width` image. pycocotools checks nothing of this until it decodes
    (then a ValueError mid-training or mid-evaluation); counts of another type are a TypeError."""
    counts = segmentation.get("counts")
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            return False
        runs = counts
    elif isinstance(counts, (str, bytes)):
        try:
            runs = rle_counts({"counts": counts}).tolist()
        except (UnicodeError, ValueError):
            return False
        if any(v < 0 for v in runs):
            return False
    else:
        return False
    return sum(runs) == height * width


def check_segmentation(segmentation: object, width: int, height: int) -> tuple[list | dict | None, str | None]:
    """(usable segmentation, None) or (None, why it is unusable). Degenerate polygon parts are
    dropped when others remain."""
    if isinstance(segmentation, list):
        parts = [p for p in segmentation if polygon_readable(p, height, width)]
        parts = [p for p in parts if _polygon_area(p) > 0]
        if not parts:
            return None, ("degenerate polygon (fewer than 3 points, zero area, or coordinates that are not "
                          "finite numbers near the image)")
        return parts, None
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        if not (isinstance(size, list) and len(size) == 2) or "counts" not in segmentation:
            return None, "malformed RLE (needs 'size' and 'counts')"
        if list(size) != [height, width]:
            return None, f"RLE size {size} does not match the image's {height}x{width}"
        if not rle_readable(segmentation, height, width):
            return None, "malformed RLE (counts are not run lengths that fill the image)"
        try:
            rle = segmentation if isinstance(segmentation["counts"], str) else mask_utils.frPyObjects(segmentation, height, width)
            if float(mask_utils.area(rle)) <= 0:
                return None, "empty RLE mask"
        except (TypeError, ValueError, OverflowError) as exc:  # negative counts overflow uint32
            return None, f"malformed RLE ({exc})"
        return segmentation, None
    return None, "no segmentation"


def _polygon_area(points: list) -> float:
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) / 2


def decode_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A validated segmentation -> uint8 mask [H, W]."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return mask_utils.decode(rle)


def load_coco(annotation_file: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> CocoDataset:
    """Read and validate `annotation_file`; images are looked up under `images_dir` (default: the
    file's folder, then its `images/` subfolder)."""
    path = Path(annotation_file)
    data = load_json(path)
    categories = load_categories(path, data)
    label_of = {c["id"]: label for label, c in enumerate(categories, 1)}
    root = Path(images_dir) if images_dir is not None else _default_images_dir(path, data)
    if not root.is_dir():
        raise UsageError(f"images folder not found: {root} (pass --images)")
    warnings: list[str] = []
    records: dict[int, ImageRecord] = {}
    missing_files = 0
    for index, image in enumerate(data["images"]):
        image_id = image.get("id") if isinstance(image, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            warnings.append(f"image #{index}: no integer 'id'; skipped")
            continue
        if image_id in records:
            warnings.append(f"image id {image_id}: duplicate id; the later entry is skipped")
            continue
        file_path = safe_image_path(root, image.get("file_name"))
        if file_path is None:
            warnings.append(f"image id {image_id}: file_name {image.get('file_name')!r} is not a relative path "
                            "inside the images folder; skipped")
            continue
        if not file_path.is_file():
            missing_files += 1
            warnings.append(f"image id {image_id}: file not found: {file_path}; skipped")
            continue
        width, height = _positive_int(image.get("width")), _positive_int(image.get("height"))
        if width is None or height is None:
            warnings.append(f"image id {image_id}: no valid width/height; skipped")
            continue
        actual = header_size(file_path)
        if actual is None:
            warnings.append(f"image id {image_id}: {file_path} is not a readable image; skipped")
            continue
        if actual != (width, height):
            warnings.append(f"image id {image_id}: {file_path} is {actual[0]}x{actual[1]} (after EXIF rotation) but "
                            f"the annotations say {width}x{height}; skipped")
            continue
        records[image_id] = ImageRecord(image_id, file_path, str(image["file_name"]), width, height)
    annotations = data.get("annotations") or []
    if not isinstance(annotations, list):  # `"annotations": true` or `5`: iterating it would raise
        raise _fatal(path, f"'annotations' is not a list (it is {type(annotations).__name__})")
    crowd = _read_annotations(annotations, records, label_of, warnings)
    if not records:
        hint = f" ({missing_files} image files not found under {root}; pass --images?)" if missing_files else ""
        raise _fatal(path, f"no usable images{hint}")
    return CocoDataset(path, list(records.values()), categories, warnings, crowd)


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as segcli decodes the image (EXIF rotation applied), from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _default_images_dir(path: Path, data: dict) -> Path:
    folder = path.parent
    first = next((i.get("file_name") for i in data["images"] if isinstance(i, dict)), None)
    for candidate in (folder, folder / "images"):
        if isinstance(first, str) and (candidate / first).is_file():
            return candidate
    return folder


def _read_annotations(annotations: list, records: dict[int, ImageRecord], label_of: dict[int, int],
                      warnings: list[str]) -> int:
    """Attach usable annotations to their images; returns the number of crowd regions ignored."""
    seen_ids: set[int] = set()
    crowd = 0
    for index, ann in enumerate(annotations):
        where = f"annotation #{index}"
        if not isinstance(ann, dict):
            warnings.append(f"{where}: not an object; skipped")
            continue
        ann_id = ann.get("id")
        where = f"annotation id {ann_id} (image id {ann.get('image_id')})"
        if not isinstance(ann_id, int) or ann_id in seen_ids:
            warnings.append(f"{where}: {'duplicate' if isinstance(ann_id, int) else 'missing'} id; skipped")
            continue
        seen_ids.add(ann_id)
        # Ids of any JSON type reach here (a list is unhashable: a TypeError, not a warning).
        record = records.get(ann.get("image_id")) if _is_id(ann.get("image_id")) else None
        if record is None:
            warnings.append(f"{where}: unknown or skipped image; skipped")
            continue
        if ann.get("iscrowd"):
            crowd += 1
            continue
        label = label_of.get(ann.get("category_id")) if _is_id(ann.get("category_id")) else None
        if label is None:
            warnings.append(f"{where}: unknown category id {ann.get('category_id')!r}; skipped")
            continue
        box, why = _clipped_box(ann.get("bbox"), record.width, record.height)
        segmentation, seg_why = check_segmentation(ann.get("segmentation"), record.width, record.height)
        if segmentation is None:
            warnings.append(f"{where}: {seg_why}; skipped")
            continue
        if box is None and why == "no bbox":  # derive it from the mask
            box, why = _clipped_box(_mask_bbox(segmentation, record.height, record.width), record.width, record.height)
        if box is None:
            warnings.append(f"{where}: {why}; skipped")
            continue
        if why:
            warnings.append(f"{where}: {why}")
        record.instances.append(Instance(ann_id, label, box, segmentation))
    return crowd


def _mask_bbox(segmentation: list | dict, height: int, width: int) -> list[float]:
    ys, xs = np.nonzero(decode_mask(segmentation, height, width))
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _clipped_box(bbox: object, width: int, height: int) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """COCO [x, y, w, h] -> xyxy clipped to the image, with a note when it was outside."""
    # JSON (as Python reads it) has NaN and Infinity: such a box would pass the size test below.
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        return None, "no bbox"
    x, y, w, h = (float(v) for v in bbox)
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        return None, f"box {bbox} is empty or outside the {width}x{height} image"
    note = None if (x0, y0, x1, y1) == (x, y, x + w, y + h) else f"box {bbox} extends outside the {width}x{height} image; clipped"
    return (x0, y0, x1, y1), note
