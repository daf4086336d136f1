"""A stand-in for the model on real footage: what moves in front of a static camera is found by
background subtraction, so tracking can be tested on real videos offline (a seeded random model
finds no people, and no people model can be downloaded here).

`MotionDetector(video)` learns the background from the video's first frames (the scene without
people) and then, per frame, turns every large blob that differs from it into a "person" with its
mask, box and a score that grows with its area (a person half in the frame scores low, as a real
detector's would). It is called as segcli's Predictor is.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from segcli.data.video import VideoReader
from segcli.predict.core import ImagePrediction
from segcli.weights import Checkpoint

PERSON = 1
MIN_AREA = 800  # pixels: smaller blobs are noise
FULL_AREA = 30000.0  # a whole person at the intel clip's scale
DIFFERENCE = 40  # grey levels


class MotionDetector:
    def __init__(self, video: Path, background_frames: int = 30, fail_at_frame: int | None = None) -> None:
        frames = []
        for frame in VideoReader(video):
            frames.append(frame.image.astype(np.float32))
            if len(frames) == background_frames:
                break
        self.background = np.mean(frames, axis=0).round().astype(np.uint8)
        self.kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
        self.fail_at_frame = fail_at_frame  # raise KeyboardInterrupt there (a Ctrl-C mid-video)
        self.checkpoint = Checkpoint(state_dict={}, arch="motion", categories=[{"id": PERSON, "name": "person"}],
                                     label_to_category_id=[0, PERSON], meta={}, source="motion")
        self.device = torch.device("cpu")

    def predict(self, decoded: list) -> list[ImagePrediction]:
        return [self._one(item) for item in decoded]

    def _one(self, decoded) -> ImagePrediction:
        if self.fail_at_frame is not None and decoded.frame == self.fail_at_frame:
            raise KeyboardInterrupt
        image = decoded.image
        difference = cv2.absdiff(image, self.background)
        _, moving = cv2.threshold(cv2.max(cv2.max(difference[..., 0], difference[..., 1]), difference[..., 2]),
                                  DIFFERENCE, 1, cv2.THRESH_BINARY)
        moving = cv2.morphologyEx(moving, cv2.MORPH_OPEN, self.kernel)
        moving = cv2.erode(cv2.dilate(moving, self.kernel, iterations=2), self.kernel, iterations=2)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(moving)
        blobs = sorted((k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= MIN_AREA),
                       key=lambda k: -stats[k, cv2.CC_STAT_AREA])
        boxes, scores, rles = [], [], []
        for k in blobs:
            x, y, w, h, area = stats[k]
            boxes.append([x, y, x + w, y + h])
            scores.append(0.3 + 0.69 * min(1.0, area / FULL_AREA))
            rle = mask_utils.encode(np.asfortranarray((labels == k).astype(np.uint8)))
            rles.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
        height, width = image.shape[:2]
        return ImagePrediction(item=decoded.item, width=width, height=height,
                               boxes=np.array(boxes, np.float32).reshape(-1, 4), scores=np.array(scores, np.float32),
                               category_ids=np.full(len(blobs), PERSON, np.int64), rles=rles,
                               frame=decoded.frame, timestamp=decoded.timestamp)
