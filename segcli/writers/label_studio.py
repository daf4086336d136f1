"""Label Studio's task JSON: segcli's COCO predictions as tasks with `predictions` (pre-annotations),
and Label Studio's finished annotations back as COCO.

Shapes go both ways as polygons (`polygonlabels`: vertices in percent of the image size, which a
person moves in the editor) or as masks (`brushlabels` with Label Studio's own brush RLE, below).

Brush RLE (what Label Studio's editor and its converter read): the mask as an RGBA image, flattened
to h*w*4 bytes, written as a bit stream, most significant bit first:
  32 bits length · 5 bits word size - 1 · 4 x 4 bits run-length field sizes - 1 · then blocks of
  1 bit (1: a run of one value, 0: a literal sequence) · 2 bits which field size · that many bits
  count - 1 · one word (run) or count words (literal) · padded with zeros to whole bytes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Iterable

import numpy as np

WORD_BITS = 8
RUN_FIELD_BITS = (3, 4, 8, 16)  # Label Studio's defaults: runs up to 8, 16, 256, 65536 words
IMAGE_TAG = "image"
POLYGON_TAG = "label"
BRUSH_TAG = "brush"


# ---- brush RLE -------------------------------------------------------------------------------

class _Bits:
    """A growing bit string, kept as a list of (value, width) fields and packed once."""

    def __init__(self) -> None:
        self.fields: list[tuple[int, int]] = []

    def put(self, value: int, width: int) -> None:
        self.fields.append((value, width))

    def packed(self) -> list[int]:
        text = "".join(format(value, f"0{width}b") for value, width in self.fields)
        text += "0" * (-len(text) % 8)
        return [int(text[start:start + 8], 2) for start in range(0, len(text), 8)]


def encode_brush_rle(values: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a flat uint8 array (usually a mask as RGBA bytes)."""
    flat = np.asarray(values, dtype=np.uint8).ravel()
    bits = _Bits()
    bits.put(flat.size, 32)
    bits.put(WORD_BITS - 1, 5)
    for size in RUN_FIELD_BITS:
        bits.put(size - 1, 4)
    longest = 1 << RUN_FIELD_BITS[-1]
    # Runs of equal values, each split at the longest count one block can hold.
    change = np.flatnonzero(np.diff(flat.astype(np.int16))) + 1
    starts = np.concatenate(([0], change)) if flat.size else np.array([], dtype=int)
    ends = np.concatenate((change, [flat.size])) if flat.size else np.array([], dtype=int)
    for start, end in zip(starts.tolist(), ends.tolist()):
        while start < end:
            count = min(end - start, longest)
            field = next(i for i, size in enumerate(RUN_FIELD_BITS) if count <= 1 << size)
            bits.put(1, 1)
            bits.put(field, 2)
            bits.put(count - 1, RUN_FIELD_BITS[field])
            bits.put(int(flat[start]), WORD_BITS)
            start += count
    return bits.packed()


def decode_brush_rle(rle: Iterable[int]) -> np.ndarray:
    """The flat uint8 array of a brush RLE (runs and literal sequences, any word and field sizes)."""
    data = bytes(rle)
    text = "".join(format(byte, "08b") for byte in data)
    position = 0

    def read(width: int) -> int:
        nonlocal position
        if position + width > len(text):
            raise ValueError("brush RLE ends early")
        value = int(text[position:position + width], 2) if width else 0
        position += width
        return value

    length = read(32)
    word = read(5) + 1
    fields = [read(4) + 1 for _ in range(4)]
    out = np.zeros(length, dtype=np.uint8)
    i = 0
    while i < length:
        run = read(1)
        end = min(length, i + 1 + read(fields[read(2)]))
        if run:
            out[i:end] = read(word)
            i = end
        else:
            while i < end:
                out[i] = read(word)
                i += 1
    return out


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """A binary mask (h, w) as the brush RLE of the RGBA image Label Studio draws it as."""
    return encode_brush_rle(np.repeat((np.asarray(mask) > 0).astype(np.uint8).ravel() * 255, 4))


def brush_rle_to_mask(rle: Iterable[int], height: int, width: int) -> np.ndarray:
    """The binary mask (h, w) of a brush RLE: where the alpha channel is drawn."""
    flat = decode_brush_rle(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values, not {height}x{width}x4")
    return flat.reshape(height, width, 4)[:, :, 3] > 127


# ---- labeling config -------------------------------------------------------------------------

def labeling_config(category_names: list[str]) -> str:
    """The project's config: the image, polygon labels and brush labels, one label per category."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=IMAGE_TAG, value="$image", zoom="true")
    for tag, name in (("PolygonLabels", POLYGON_TAG), ("BrushLabels", BRUSH_TAG)):
        labels = ET.SubElement(view, tag, name=name, toName=IMAGE_TAG)
        for category in category_names:
            ET.SubElement(labels, "Label", value=category)
    return ET.tostring(view, encoding="unicode")


def config_categories(config: str) -> list[str]:
    """The label names of a project's config, in order, each once (segcli's COCO category order)."""
    names: list[str] = []
    for label in ET.fromstring(config).iter("Label"):
        value = label.get("value")
        if value and value not in names:
            names.append(value)
    return names


# ---- COCO predictions -> tasks ---------------------------------------------------------------

def task_results(annotations: list[dict[str, Any]], width: int, height: int, names: dict[int, str],
                 shape: str) -> list[dict[str, Any]]:
    """The regions of one image's detections (COCO annotations, or the instances of a segcli
    record): polygons (percent vertices) or brush masks."""
    from pycocotools import mask as mask_utils

    from segcli.writers.polygons import mask_polygons
    from segcli.writers.records import flat_exteriors

    results = []
    for annotation in annotations:
        label = names[annotation["category_id"]]
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, dict):
            rle = dict(segmentation)
            if isinstance(rle.get("counts"), str):
                rle["counts"] = rle["counts"].encode("ascii")
            mask = mask_utils.decode(rle)
        elif segmentation:
            rles = mask_utils.frPyObjects(segmentation, height, width)
            mask = mask_utils.decode(mask_utils.merge(rles))
        else:
            continue
        common = {"to_name": IMAGE_TAG, "original_width": width, "original_height": height,
                  "image_rotation": 0}
        if annotation.get("score") is not None:
            common["score"] = float(annotation["score"])
        if shape == "brush":
            results.append({**common, "from_name": BRUSH_TAG, "type": "brushlabels",
                            "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]}})
            continue
        # A segcli record's instance brings its polygons (--poly-tolerance); a COCO annotation is traced.
        outlines = (flat_exteriors(annotation) if "polygons" in annotation
                    else [polygon.flat_exterior() for polygon in mask_polygons(mask.astype(bool))])
        for flat in outlines:
            points = [[100.0 * x / width, 100.0 * y / height] for x, y in zip(flat[0::2], flat[1::2])]
            if len(points) >= 3:
                results.append({**common, "from_name": POLYGON_TAG, "type": "polygonlabels",
                                "value": {"points": points, "closed": True, "polygonlabels": [label]}})
    return results


def tasks_from_coco(coco: dict[str, Any], image_url: Any, shape: str = "polygon",
                    model_version: str = "segcli", keep: set[str] | None = None) -> list[dict[str, Any]]:
    """One task per image of a COCO predictions file (all, or those whose file_name is in `keep`),
    each with its detections as one prediction. `image_url(file_name)` gives the URL Label Studio
    loads the image from; `data.segcli_file` keeps the file_name (the key pushes are idempotent by)."""
    names = {category["id"]: category["name"] for category in coco.get("categories", [])}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for annotation in coco.get("annotations", []):
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    tasks = []
    for image in coco.get("images", []):
        if keep is not None and image["file_name"] not in keep:
            continue
        tasks.append(task(image["file_name"], image["width"], image["height"], by_image.get(image["id"], []),
                          names, image_url, shape, model_version))
    return tasks


def task(file_name: str, width: int, height: int, detections: list[dict[str, Any]], names: dict[int, str],
         image_url: Any, shape: str, model_version: str) -> dict[str, Any]:
    """One image's task: its URL, its file_name (`data.segcli_file`), its detections as one prediction."""
    scores = [float(a["score"]) for a in detections if a.get("score") is not None]
    return {
        "data": {IMAGE_TAG: image_url(file_name), "segcli_file": file_name, "width": width, "height": height},
        "predictions": [{"model_version": model_version,
                         "result": task_results(detections, width, height, names, shape),
                         "score": round(float(np.mean(scores)), 5) if scores else 0.0}],
    }


def write_label_studio(handle, records: Iterable[dict[str, Any]], categories: list[dict[str, Any]],
                       image_url: Any, shape: str, model_version: str) -> None:
    """`segcli predict --format label-studio`: a JSON list of tasks (Label Studio's import file),
    one per record, written to the binary `handle` as records come (constant memory)."""
    import json

    names = {category["id"]: category["name"] for category in categories}
    handle.write(b"[")
    for number, record in enumerate(records):
        one = task(record["file"], record["width"], record["height"], record["instances"], names, image_url,
                   shape, model_version)
        handle.write(((",\n" if number else "\n") + json.dumps(one, ensure_ascii=False)).encode("utf-8"))
    handle.write(b"\n]\n")


# ---- finished annotations -> COCO ------------------------------------------------------------

def results_to_coco(finished: list[tuple[dict[str, Any], list[dict[str, Any]]]],
                    category_names: list[str]) -> dict[str, Any]:
    """A COCO dataset of (task, annotation result) pairs: polygons stay polygons (pixels), brush
    masks become compressed RLE; categories are the config's labels, ids from 1 in its order."""
    from pycocotools import mask as mask_utils

    ids = {name: i for i, name in enumerate(category_names, start=1)}
    images, annotations = [], []
    for image_id, (task, results) in enumerate(finished, start=1):
        data = task.get("data", {})
        sizes = [(r["original_width"], r["original_height"]) for r in results if r.get("original_width")]
        width, height = (data.get("width"), data.get("height")) if data.get("width") else (sizes[0] if sizes else (0, 0))
        name = data.get("segcli_file") or urllib_name(data.get(IMAGE_TAG, ""))
        images.append({"id": image_id, "file_name": name, "width": int(width), "height": int(height),
                       "label_studio_task": task.get("id")})
        for result in results:
            value = result.get("value", {})
            kind = result.get("type")
            labels = value.get(kind) or []
            if kind not in ("polygonlabels", "brushlabels") or not labels or labels[0] not in ids:
                continue
            if kind == "polygonlabels":
                flat = [round(c, 2) for x, y in value["points"] for c in (x * width / 100.0, y * height / 100.0)]
                if len(flat) < 6:
                    continue
                segmentation: Any = [flat]
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            else:
                mask = brush_rle_to_mask(value["rle"], height, width)
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            area = float(mask_utils.area(rle))
            if area <= 0:
                continue
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[labels[0]],
                                "segmentation": segmentation, "area": area, "bbox": [x, y, w, h], "iscrowd": 0})
    categories = [{"id": i, "name": name, "supercategory": ""} for name, i in ids.items()]
    return {"info": {"description": "segcli pull from Label Studio"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories}


def urllib_name(url: str) -> str:
    """The file name a task's image URL ends in (tasks pushed by something other than segcli)."""
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    query = urllib.parse.parse_qs(parsed.query)
    return urllib.parse.unquote(query["d"][0] if "d" in query else parsed.path.rsplit("/", 1)[-1])
