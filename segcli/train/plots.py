"""`--plots DIR`: the training curves as PNG, drawn with Pillow (no plotting library), as
evaluate/plots.py draws its precision-recall curves.

`loss.png`: the total loss of every logged iteration and each epoch's mean loss, against
iterations. `ap.png` (with --val-coco): validation mask and box AP against epochs. Both are
redrawn from metrics.jsonl after every epoch and written atomically, so a reader (or a killed
run) sees the previous picture or the new one, whole.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from segcli.atomic import atomic_write
from segcli.evaluate.plots import COLOURS, GRID, INK, MARGIN, SIZE, _font

Series = tuple[str, list[tuple[float, float]]]  # label, (x, y) points


def read_metrics(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                continue
    return records


def nice_step(span: float, ticks: int = 5) -> float:
    """A round tick spacing (1, 2 or 5 x 10^k) giving about `ticks` intervals over `span`."""
    raw = max(span, 1e-12) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def draw_lines(series: list[Series], title: str, x_label: str, y_label: str, y_max: float | None = None) -> Image.Image:
    """A white SIZE image: axes from 0 (y) and the first x, round-numbered grid, one polyline per
    series (a dot where a series has a single point), a legend, a title."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(18), _font(14)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    points = [p for _, line in series for p in line if math.isfinite(p[1])]
    x0 = min((p[0] for p in points), default=0.0)
    x1 = max((p[0] for p in points), default=1.0)
    x1 = x1 if x1 > x0 else x0 + 1
    top_value = y_max if y_max is not None else max((p[1] for p in points), default=1.0) * 1.05
    top_value = top_value if top_value > 0 else 1.0

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - min(max(y, 0.0), top_value) / top_value * (bottom - top)

    for axis, low, high in (("x", x0, x1), ("y", 0.0, top_value)):
        step = nice_step(high - low) if axis == "y" else max(1, nice_step(high - low))  # x: iterations, epochs
        value = math.ceil(low / step) * step
        while value <= high + 1e-9:
            text = f"{value:g}"
            if axis == "x":
                x, _ = to_pixel(value, 0)
                draw.line([(x, top), (x, bottom)], fill=GRID)
                draw.text((x, bottom + 6), text, fill=INK, font=small, anchor="mt")
            else:
                _, y = to_pixel(x0, value)
                draw.line([(left, y), (right, y)], fill=GRID)
                draw.text((left - 8, y), text, fill=INK, font=small, anchor="rm")
            value += step
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) / 2, SIZE[1] - 10), x_label, fill=INK, font=font, anchor="md")
    label_image = Image.new("RGB", (200, 30), "white")
    ImageDraw.Draw(label_image).text((100, 15), y_label, fill=INK, font=font, anchor="mm")
    image.paste(label_image.rotate(90, expand=True), (8, (top + bottom) // 2 - 100))
    draw.text((left, top - 12), title, fill=INK, font=font, anchor="ld")
    drawn = []
    for index, (_, line) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [to_pixel(x, y) for x, y in line if math.isfinite(y)]
        drawn.append(pixels)
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=3)
        for x, y in pixels if len(pixels) <= 20 else ():
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    labelled = [label for label, line in series if line]
    if labelled:
        height = 28 + 24 * (len(labelled) - 1)
        corners = [(right - 230, top + 6), (right - 230, bottom - 6 - height), (left + 6, top + 6)]
        legend_x, legend_y = min(corners, key=lambda corner: _points_under(drawn, corner, (224, height)))
        draw.rectangle([legend_x, legend_y, legend_x + 224, legend_y + height], fill="white", outline=GRID)
        for index, label in enumerate(labelled):
            colour = COLOURS[index % len(COLOURS)]
            y = legend_y + 14 + 24 * index
            draw.line([(legend_x + 8, y), (legend_x + 38, y)], fill=colour, width=3)
            draw.text((legend_x + 46, y), label, fill=INK, font=small, anchor="lm")
    return image


def _points_under(lines: list[list[tuple[float, float]]], corner: tuple[float, float], size: tuple[int, int]) -> int:
    """How much of the polylines a legend box at `corner` would hide (points every ~4 pixels): the
    legend goes to the emptiest of the candidate corners (AP curves end top right)."""
    (x0, y0), (width, height) = corner, size
    hidden = 0
    for pixels in lines:
        for (ax, ay), (bx, by) in zip(pixels, pixels[1:] or pixels):
            steps = max(1, int(max(abs(bx - ax), abs(by - ay)) / 4))
            for k in range(steps + 1):
                x, y = ax + (bx - ax) * k / steps, ay + (by - ay) * k / steps
                hidden += x0 <= x <= x0 + width and y0 <= y <= y0 + height
    return hidden


def write_png(image: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def write_training_plots(metrics: list[dict], folder: Path) -> list[Path]:
    """Write `folder/loss.png`, and `folder/ap.png` once a validation was scored; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    logged = [(m["iteration"], m["loss"]) for m in metrics if "loss" in m and "iteration" in m]
    epochs = [m for m in metrics if "seconds" in m]
    per_epoch = [(m["iteration"], m["train_loss"]) for m in epochs if "train_loss" in m]
    paths = [write_png(draw_lines([("loss (logged iterations)", logged), ("epoch mean", per_epoch)],
                                  "training loss", "iteration", "loss"), folder / "loss.png")]
    validated = [m for m in epochs if "val_segm_AP" in m]
    if validated:
        series = [(f"{name} AP", [(m["epoch"], m[f"val_{kind}_AP"]) for m in validated if f"val_{kind}_AP" in m])
                  for name, kind in (("mask", "segm"), ("box", "bbox"))]
        best = max(max((y for _, y in line), default=0.0) for _, line in series)
        paths.append(write_png(draw_lines(series, "validation AP (0.50:0.95)", "epoch", "AP",
                                          y_max=min(1.0, max(0.05, best * 1.1))), folder / "ap.png"))
    return paths
