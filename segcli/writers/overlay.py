"""`--overlay DIR`: pictures of the predictions for people to look at.

Images get `<DIR>/<stem>.jpg` (masks blended in, boxes, `name score` labels); a video gets one
overlay video `<DIR>/<stem>.mp4` (mp4v), or `.avi` (MJPG) where this OpenCV cannot write mp4,
written frame by frame and moved into place when the video ends.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from segcli.atomic import atomic_write, new_file_mode, remove_stale_temporaries, temporary_prefix
from segcli.ops.rle_crops import rle_to_crop

_ALPHA = 0.45


def instance_colour(rank: int) -> tuple[int, int, int]:
    """A bright BGR colour per instance, far apart for neighbouring ranks (golden-angle hues)."""
    import cv2

    hue = int((rank * 137.508) % 180)
    pixel = cv2.cvtColor(np.array([[[hue, 220, 255]]], np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return int(pixel[0]), int(pixel[1]), int(pixel[2])


def draw(image_rgb: np.ndarray, record: dict) -> np.ndarray:
    """A BGR copy of the image with every instance drawn, the best-scoring one on top."""
    import cv2

    canvas = np.ascontiguousarray(image_rgb[:, :, ::-1])
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 400))
    scale = max(0.35, min(height, width) / 1000)
    instances = record["instances"]
    for rank in range(len(instances) - 1, -1, -1):
        instance = instances[rank]
        track_id = instance.get("track_id")
        colour = instance_colour(rank if track_id is None else track_id)  # --track: one colour per track
        crop = rle_to_crop(instance["segmentation"])  # the mask's crop: no image-size mask per instance
        region = canvas[crop.y0:crop.y1, crop.x0:crop.x1]
        region[crop.mask] = (region[crop.mask] * (1 - _ALPHA) + np.array(colour) * _ALPHA).astype(np.uint8)
        x, y, w, h = instance["bbox"]
        top_left = (int(round(x)), int(round(y)))
        cv2.rectangle(canvas, top_left, (int(round(x + w)), int(round(y + h))), colour, thickness)
        label = f"{instance['category_name']} {instance['score']:.2f}"
        if track_id is not None:
            label = f"#{track_id} {label}"
        (text_w, text_h), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        label_y = top_left[1] - 2 if top_left[1] - text_h - base - 2 >= 0 else top_left[1] + text_h + 2
        cv2.rectangle(canvas, (top_left[0], label_y - text_h - 2), (top_left[0] + text_w + 2, label_y + base - 1),
                      colour, -1)
        cv2.putText(canvas, label, (top_left[0] + 1, label_y - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return canvas


def video_codec() -> tuple[str, str]:
    """(fourcc, extension) that this OpenCV build can write: mp4v in .mp4, else MJPG in .avi."""
    import cv2

    for fourcc, suffix in (("mp4v", ".mp4"), ("MJPG", ".avi")):
        handle, probe = tempfile.mkstemp(suffix=suffix)
        os.close(handle)
        try:
            writer = cv2.VideoWriter(probe, cv2.VideoWriter_fourcc(*fourcc), 10.0, (16, 16))
            ok = writer.isOpened()
            if ok:
                writer.write(np.zeros((16, 16, 3), np.uint8))
            writer.release()
            if ok and os.path.getsize(probe) > 0:
                return fourcc, suffix
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    raise RuntimeError("this OpenCV build can write neither mp4v nor MJPG video")


class OverlayWriter:
    def __init__(self, out: Path, quality: int = 90) -> None:
        self.out = out
        self.quality = quality
        self._videos: dict[str, tuple] = {}  # stem -> (cv2.VideoWriter, temporary path, final relative path)
        self._codec: tuple[str, str] | None = None

    def write_image(self, stem: str, image_rgb: np.ndarray, record: dict) -> list[str]:
        import cv2

        relative = stem + ".jpg"
        ok, data = cv2.imencode(".jpg", draw(image_rgb, record), [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {relative}")
        with atomic_write(self.out / relative, "wb") as handle:
            handle.write(data.tobytes())
        return [relative]

    def add_frame(self, stem: str, image_rgb: np.ndarray, record: dict, fps: float) -> None:
        """Append a frame to the overlay video of `stem` (opened at its first frame)."""
        import cv2

        if stem not in self._videos:
            self._codec = self._codec or video_codec()
            fourcc, suffix = self._codec
            final = self.out / (stem + suffix)
            final.parent.mkdir(parents=True, exist_ok=True)
            # FFmpeg picks the container from the extension, so the temporary name must end with it;
            # named by host and pid, so that a SIGKILLed run's half-written video is removed here.
            remove_stale_temporaries(final)
            handle, temporary = tempfile.mkstemp(prefix=temporary_prefix(final), suffix=".tmp" + suffix,
                                                 dir=final.parent)
            os.close(handle)
            height, width = image_rgb.shape[:2]
            writer = cv2.VideoWriter(temporary, cv2.VideoWriter_fourcc(*fourcc), fps if fps > 0 else 10.0,
                                     (width, height))
            if not writer.isOpened():
                os.unlink(temporary)
                raise RuntimeError(f"OpenCV cannot write the overlay video {final}")
            self._videos[stem] = (writer, temporary, stem + suffix, (width, height))
        writer, _, _, size = self._videos[stem]
        canvas = draw(image_rgb, record)
        if (canvas.shape[1], canvas.shape[0]) != size:  # a stream that changes size mid-way
            canvas = cv2.resize(canvas, size)
        writer.write(canvas)

    def finish_video(self, stem: str) -> list[str]:
        """Close the overlay video of `stem` and move it into place; [] if it had no frame."""
        entry = self._videos.pop(stem, None)
        if entry is None:
            return []
        writer, temporary, relative, _ = entry
        writer.release()
        os.chmod(temporary, new_file_mode())  # mkstemp made it 0600; outputs follow the umask
        os.replace(temporary, self.out / relative)
        return [relative]

    def abort(self) -> None:
        """Drop unfinished overlay videos (their temporary files)."""
        for writer, temporary, _, _ in self._videos.values():
            writer.release()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        self._videos.clear()
