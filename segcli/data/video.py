"""Read a video frame by frame, never holding more than the current frame.

OpenCV's FFmpeg backend reads whatever containers and codecs it was built with (mp4, avi, mkv,
mov, webm...). Frame counts in headers are estimates (or lies), so a video is read until the
decoder stops; a video that yields no frame at all is an error, one that stops early is not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from segcli.data.images import ImageReadError, check_regular_file, quiet_opencv

# FFmpeg prints its own complaints about damaged streams ("Invalid NAL unit size") straight to
# stderr, several lines per bad video; segcli reports a bad video in one line itself. OpenCV reads
# this when it first opens a video; a user who wants FFmpeg's messages sets it (e.g. to 16).
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


@dataclass
class Frame:
    index: int  # 0-based position in the video, counting every frame (also those skipped by the stride)
    timestamp: float  # seconds from the start of the video: index / fps (constant frame rate assumed)
    image: np.ndarray  # HxWx3 uint8 RGB


@dataclass
class VideoInfo:
    claimed_frames: int  # what the header says; 0 when it does not say
    fps: float  # 0.0 when the header does not say
    width: int
    height: int


class VideoReader:
    """Iterate over a video's frames; `info` is read when the file is opened.

    Raises `ImageReadError` (the same error type as images, so callers handle one kind) when the
    file cannot be opened as a video or yields no frame.
    """

    def __init__(self, path: str | os.PathLike, stride: int = 1) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        cv2 = quiet_opencv()

        self.path = Path(path)
        self.stride = stride
        check_regular_file(self.path)
        self._capture = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not self._capture.isOpened():
            self._capture.release()
            raise ImageReadError(self.path, "cannot open as a video (unsupported or corrupt)")
        self.info = VideoInfo(
            claimed_frames=max(0, int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)),
            fps=float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0),
            width=int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0),
            height=int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0),
        )
        self.frames_read = 0  # frames the decoder delivered, stride-skipped ones included

    def __iter__(self) -> Iterator[Frame]:
        import cv2

        capture = self._capture
        try:
            while True:
                index = self.frames_read
                wanted = index % self.stride == 0
                # grab() skips the colour conversion and copy for frames the stride drops.
                ok, frame = capture.read() if wanted else (capture.grab(), None)
                if not ok:
                    break
                self.frames_read += 1
                if not wanted:
                    continue
                if frame is None or frame.ndim != 3 or frame.size == 0:
                    break
                yield Frame(index, self._timestamp(capture.get(cv2.CAP_PROP_POS_MSEC), index),
                            np.ascontiguousarray(frame[:, :, ::-1]))
        finally:
            capture.release()
        if self.frames_read == 0:
            raise ImageReadError(self.path, "video has no frames (empty, truncated or corrupt)")

    def _timestamp(self, position_ms: float, index: int) -> float:
        # index / fps: FFmpeg's own position is off by the decoder's delay in some containers (AVI
        # starts at 0.2 s and steps back at the end), so it is used only when the rate is unknown.
        if self.info.fps > 0:
            return round(index / self.info.fps, 6)
        return round(max(position_ms or 0.0, 0.0) / 1000.0, 6)

    def close(self) -> None:
        self._capture.release()

    def ended_early(self) -> str | None:
        """A note when the decoder stopped well before the header's frame count (truncated file?)."""
        claimed = self.info.claimed_frames
        if claimed and self.frames_read < claimed * 0.9 and claimed - self.frames_read > 2:
            return f"video ended after {self.frames_read} frames; its header claims {claimed} (truncated?)"
        return None
