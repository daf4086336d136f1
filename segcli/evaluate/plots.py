"""Precision-recall curves of a COCO evaluation, drawn as PNG with Pillow (no plotting library).

The curves are pycocotools' own: `COCOeval.eval["precision"]` holds, for each IoU threshold,
recall point (0, 0.01, ..., 1), class, area range and detection limit, the interpolated
precision. Each plot shows, over all areas at 100 detections per image, the curve at IoU 0.50,
at IoU 0.75, and averaged over IoU 0.50:0.95, each averaged over the classes that have ground
truth; the mean height of a curve is the AP in its legend.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools.cocoeval import COCOeval

from segcli.atomic import atomic_write

SIZE = (800, 600)
MARGIN = (80, 50, 30, 70)  # left, top, right, bottom
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44))
GRID = (225, 225, 225)
INK = (30, 30, 30)


def pr_curves(evaluator: COCOeval) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{label: (recall, precision)}` for IoU 0.50, 0.75 and the 0.50:0.95 mean (labels carry AP).

    At each recall point the precision is the mean over the classes (and IoU thresholds) whose
    entry is defined (pycocotools writes -1 where a class has no ground truth). A curve with no
    defined entry at all (no ground truth) is left out."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [T, R, K]: all areas, 100 detections
    recall = np.asarray(evaluator.params.recThrs, dtype=np.float64)
    thresholds = np.asarray(evaluator.params.iouThrs)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    choices = [(f"IoU={t:.2f}", precision[np.isclose(thresholds, t)]) for t in (0.5, 0.75)]
    choices.append((f"IoU={thresholds[0]:.2f}:{thresholds[-1]:.2f}", precision))
    for label, block in choices:
        if block.size == 0:
            continue
        valid = block > -1
        counts = valid.sum(axis=(0, 2))
        if not counts.any():
            continue
        sums = np.where(valid, block, 0.0).sum(axis=(0, 2))
        curve = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        ap = float(block[valid].mean())
        curves[f"{label}  AP {ap:.3f}"] = (recall, curve)
    return curves


def draw_pr_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Image.Image:
    """A white SIZE image: axes 0..1 with a 0.1 grid, one polyline per curve, a legend, a title."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(18), _font(14)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return left + x * (right - left), bottom - y * (bottom - top)

    for step in range(11):
        value = step / 10
        x, _ = to_pixel(value, 0)
        _, y = to_pixel(0, value)
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((x, bottom + 6), f"{value:.1f}", fill=INK, font=small, anchor="mt")
        draw.text((left - 8, y), f"{value:.1f}", fill=INK, font=small, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) / 2, SIZE[1] - 10), "recall", fill=INK, font=font, anchor="md")
    label_image = Image.new("RGB", (200, 30), "white")
    ImageDraw.Draw(label_image).text((100, 15), "precision", fill=INK, font=font, anchor="mm")
    image.paste(label_image.rotate(90, expand=True), (8, (top + bottom) // 2 - 100))
    draw.text((left, top - 12), title, fill=INK, font=font, anchor="ld")

    if not curves:
        draw.text(((left + right) / 2, (top + bottom) / 2), "no ground truth to score against",
                  fill=INK, font=font, anchor="mm")
    for index, (label, (recall, precision)) in enumerate(curves.items()):
        draw.line([to_pixel(float(r), float(p)) for r, p in zip(recall, precision)],
                  fill=COLOURS[index % len(COLOURS)], width=3)
    if curves:  # the legend on a white box, so that curves passing under it do not hide it
        draw.rectangle([left + 6, bottom - 34 - 24 * (len(curves) - 1), left + 300, bottom - 6], fill="white", outline=GRID)
    for index, label in enumerate(curves):
        colour = COLOURS[index % len(COLOURS)]
        y = bottom - 20 - 24 * (len(curves) - 1 - index)
        draw.line([(left + 14, y), (left + 44, y)], fill=colour, width=3)
        draw.text((left + 52, y), label, fill=INK, font=small, anchor="lm")
    return image


def write_pr_plots(evals: dict[str, COCOeval], folder: Path) -> list[Path]:
    """Write `folder/pr_<iou type>.png` for each evaluation, atomically; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for iou_type, evaluator in evals.items():
        image = draw_pr_plot(pr_curves(evaluator), f"precision-recall, {iou_type} (all areas, 100 detections)")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        path = plot_path(folder, iou_type)
        with atomic_write(path, "wb") as handle:
            handle.write(buffer.getvalue())
        paths.append(path)
    return paths


def plot_path(folder: Path, iou_type: str) -> Path:
    return folder / f"pr_{iou_type}.png"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()
