"""Generate a synthetic instance-segmentation dataset in COCO format (offline, seeded).

    python examples/synthetic_shapes.py OUT_DIR [--images 300] [--size 256] [--seed 0]

writes OUT_DIR/images/*.png and OUT_DIR/annotations.json. Five shape classes (circle, square,
triangle, ring, star) of varied sizes and colours on textured backgrounds. Shapes overlap and
occlude each other: each annotation is the *visible* part, so masks get holes and several parts.
Rings have a hole by construction. Masks are stored as polygons when a shape is one simple region
and as RLE otherwise, so readers meet both encodings. Category ids are 1, 3, 5, 7, 9 (not
contiguous) as in real exports.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CLASSES = ("circle", "square", "triangle", "ring", "star")
CATEGORY_IDS = (1, 3, 5, 7, 9)
MIN_VISIBLE_FRACTION = 0.5  # shapes hidden more than half are dropped (annotators skip them too)
MIN_VISIBLE_PIXELS = 40


def textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour gradient plus blurred noise and a few random lines: not a flat colour, so the
    model must learn shapes rather than 'anything that is not the background'."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-60, 60, (2, 3))
    image = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    noise = cv2.GaussianBlur(rng.normal(0, 25, (size, size, 3)).astype(np.float32), (0, 0), rng.uniform(1, 4))
    image = image + noise
    for _ in range(rng.integers(0, 5)):
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.line(image, tuple(int(v) for v in p1), tuple(int(v) for v in p2), color, int(rng.integers(1, 3)))
    return image


def shape_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A filled shape of class `kind` at a random place, size and rotation, as a bool mask."""
    mask = np.zeros((size, size), np.uint8)
    radius = rng.uniform(0.09, 0.22) * size
    cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        cv2.ellipse(mask, (int(cx), int(cy)), (int(radius), int(radius * rng.uniform(0.8, 1.0))),
                    math.degrees(angle), 0, 360, 1, -1)
    elif kind == "ring":
        cv2.circle(mask, (int(cx), int(cy)), int(radius), 1, -1)
        cv2.circle(mask, (int(cx), int(cy)), int(radius * rng.uniform(0.45, 0.65)), 0, -1)
    else:
        if kind == "square":
            angles = angle + np.arange(4) * math.pi / 2 + math.pi / 4
            radii = np.full(4, radius)
        elif kind == "triangle":
            angles = angle + np.arange(3) * 2 * math.pi / 3
            radii = np.full(3, radius * 1.15)
        else:  # star
            angles = angle + np.arange(10) * math.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, radius * 1.1, radius * 0.5)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask.astype(bool)


def encode_segmentation(mask: np.ndarray) -> list | dict:
    """Polygon when the visible region is one part without holes, else RLE (COCO's two encodings)."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) == 1 and len(contours[0]) >= 3:
        return [contours[0].reshape(-1).astype(float).tolist()]
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def make_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    image = textured_background(rng, size)
    drawn: list[tuple[int, np.ndarray]] = []  # (class index, full mask), bottom to top
    for _ in range(rng.integers(1, 5)):
        kind = int(rng.integers(len(CLASSES)))
        mask = shape_mask(rng, CLASSES[kind], size)
        color = rng.uniform(0, 255, 3)
        shading = rng.normal(0, 12, (size, size, 1))  # texture inside the shape too
        image = np.where(mask[..., None], color + shading, image)
        drawn.append((kind, mask))
    instances = []
    for position, (kind, mask) in enumerate(drawn):
        visible = mask.copy()
        for _, above in drawn[position + 1:]:
            visible &= ~above
        if visible.sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * mask.sum()):
            instances.append((kind, visible))
    return np.clip(image, 0, 255).astype(np.uint8), instances


def generate(out_dir: Path, images: int, size: int = 256, seed: int = 0) -> Path:
    """Write the dataset; returns the annotation file's path."""
    rng = np.random.default_rng(seed)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    coco = {
        "info": {"description": f"segcli synthetic shapes, seed {seed}"},
        "images": [], "annotations": [],
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(CATEGORY_IDS, CLASSES)],
    }
    for image_id in range(1, images + 1):
        image, instances = make_image(rng, size)
        file_name = f"shapes_{seed}_{image_id:05d}.png"
        cv2.imwrite(str(image_dir / file_name), image[..., ::-1])
        coco["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for kind, mask in instances:
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[kind],
                "segmentation": encode_segmentation(mask), "area": float(mask.sum()),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], "iscrowd": 0,
            })
    path = out_dir / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = generate(args.out_dir, args.images, args.size, args.seed)
    print(path)


if __name__ == "__main__":
    main()
