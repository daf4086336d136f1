"""Generate a synthetic video of shapes moving over a textured background, with the true identity
of every shape in every frame (offline, seeded): a check for `segcli predict --track` with the
demo model, which finds the shapes that synthetic_shapes.py draws.

    python examples/moving_shapes.py OUT.avi [--frames 48] [--size 256] [--seed 0]
    segcli predict OUT.avi --weights shapes_demo --track --out tracks.jsonl --overlay tracked/

writes OUT.avi (MJPG, 10 fps) and OUT.json: `{"fps", "size", "categories", "frames": [[{"object",
"category_id", "segmentation"}, ...], ...]}`, per frame the shapes visible at least half, with
their object number (1, 2, ...) and visible mask (COCO RLE). The script of the scene:

1. a shape enters from the left, crosses the frame and leaves it on the right two thirds in;
2. a shape drifts slowly down in the middle the whole time;
3. a third enters from the right a third of the way in and moves left;
4. once the first has gone, a shape of the same class appears at the lower left: a new object,
   which a tracker must not give the first one's id.
Their paths never overlap, so every shape is visible whole once inside the frame.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

FPS = 10.0


def _synthetic_shapes():
    spec = importlib.util.spec_from_file_location("synthetic_shapes", Path(__file__).with_name("synthetic_shapes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class MovingShape:
    kind: int  # class index in synthetic_shapes.CLASSES
    template: np.ndarray  # bool mask of the shape, cropped to its box
    colour: np.ndarray
    start: tuple[float, float]  # centre (x, y) at frame `first`
    velocity: tuple[float, float]  # pixels per frame
    first: int
    last: int

    def mask(self, frame: int, size: int) -> np.ndarray:
        """The whole shape at `frame`, placed in a size x size canvas (clipped at its edges)."""
        canvas = np.zeros((size, size), bool)
        h, w = self.template.shape
        cx = self.start[0] + self.velocity[0] * (frame - self.first)
        cy = self.start[1] + self.velocity[1] * (frame - self.first)
        x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
        xs, ys = slice(max(x0, 0), min(x0 + w, size)), slice(max(y0, 0), min(y0 + h, size))
        if xs.start < xs.stop and ys.start < ys.stop:
            canvas[ys, xs] = self.template[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        return canvas


def scene(rng: np.random.Generator, frames: int, size: int) -> list[MovingShape]:
    shapes_module = _synthetic_shapes()

    def template(kind: int) -> np.ndarray:
        while True:  # small enough that the paths below never make shapes overlap
            mask = shapes_module.shape_mask(rng, shapes_module.CLASSES[kind], size)
            ys, xs = np.nonzero(mask)
            if max(np.ptp(ys), np.ptp(xs)) < 0.28 * size:
                return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]

    kinds = [int(k) for k in rng.permutation(len(shapes_module.CLASSES))[:3]]
    colours = rng.uniform(0, 255, (4, 3))
    first = template(kinds[0])
    leave = int(frames * 2 / 3)
    enter = frames // 3
    return [
        MovingShape(kinds[0], first, colours[0], (-first.shape[1] / 2 + 10, size * 0.2),
                    ((size + first.shape[1]) / leave, 0.0), 0, leave),
        MovingShape(kinds[1], template(kinds[1]), colours[1], (size * 0.5, size * 0.5),
                    (0.0, size * 0.1 / frames), 0, frames - 1),
        MovingShape(kinds[2], template(kinds[2]), colours[2], (size + 20.0, size * 0.8),
                    (-(size * 0.4 + 20.0) / (frames - 1 - enter), 0.0), enter, frames - 1),
        MovingShape(kinds[0], template(kinds[0]), colours[3], (size * 0.18, size * 0.8), (0.3, -0.2), leave + 4,
                    frames - 1),
    ]


def generate(out: Path, frames: int = 48, size: int = 256, seed: int = 0) -> Path:
    """Write the video and its ground truth; returns the ground truth's path."""
    shapes_module = _synthetic_shapes()
    rng = np.random.default_rng(seed)
    background = shapes_module.textured_background(rng, size)
    shapes = scene(rng, frames, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (size, size))
    if not writer.isOpened():
        raise SystemExit(f"OpenCV cannot write {out}")
    truth = []
    for frame in range(frames):
        image = background.copy()
        drawn = []  # bottom to top: later shapes pass over earlier ones
        for number, shape in enumerate(shapes, start=1):
            if shape.first <= frame <= shape.last:
                mask = shape.mask(frame, size)
                shading = rng.normal(0, 12, (size, size, 1))
                image = np.where(mask[..., None], shape.colour + shading, image)
                drawn.append((number, shape, mask))
        visible_shapes = []
        full_sizes = {number: shape.template.sum() for number, shape, _ in drawn}
        for position, (number, shape, mask) in enumerate(drawn):
            visible = mask.copy()
            for _, _, above in drawn[position + 1:]:
                visible &= ~above
            if visible.sum() >= 0.5 * full_sizes[number]:
                rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
                visible_shapes.append({"object": number, "category_id": shapes_module.CATEGORY_IDS[shape.kind],
                                       "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}})
        truth.append(visible_shapes)
        writer.write(np.clip(image, 0, 255).astype(np.uint8)[..., ::-1])
    writer.release()
    categories = [{"id": cid, "name": name} for cid, name in zip(shapes_module.CATEGORY_IDS, shapes_module.CLASSES)]
    path = out.with_suffix(".json")
    path.write_text(json.dumps({"fps": FPS, "size": size, "categories": categories, "frames": truth}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="video file to write (.avi)")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(generate(args.out, args.frames, args.size, args.seed))


if __name__ == "__main__":
    main()
