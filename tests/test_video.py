"""Videos: frames and timestamps against OpenCV read directly, strides, lying and truncated
headers, empty videos, and predict over a mixed folder with an overlay video."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from segcli.data.decode import Decoded, InputDone, iter_decoded
from segcli.data.images import ImageReadError
from segcli.data.sources import InputItem, expand_sources
from segcli.data.video import VideoReader
from segcli.predict.options import PredictOptions
from segcli.predict.run import run_predict
from tests.conftest import SHARED_DATA, require
from tests.test_predict_cli import photos  # noqa: F401  (fixture)
from tests.test_resume import checkpoint  # noqa: F401  (fixture: the small model at 160 px)

VIDEOS = SHARED_DATA / "videos"


def write_avi(path: Path, frames: int, size=(64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), (i * 8) % 256, np.uint8))
    writer.release()
    return path


def opencv_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


@pytest.mark.parametrize("name", ["again.mkv", "arjun234_vtest.avi"])
def test_frames_match_opencv_read_directly(name):
    path = require(VIDEOS / name)
    reference = opencv_frames(path)
    frames = list(VideoReader(path))
    assert len(frames) == len(reference) > 50
    assert [f.index for f in frames] == list(range(len(reference)))
    for frame, expected in zip(frames[::17], reference[::17]):
        assert np.array_equal(frame.image, expected[:, :, ::-1])  # RGB
    stamps = [f.timestamp for f in frames]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    fps = cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FPS)
    assert stamps[-1] - stamps[0] == pytest.approx((len(frames) - 1) / fps, rel=0.02)


def test_stride_keeps_every_nth_frame_with_its_real_index():
    path = require(VIDEOS / "again.mkv")
    every = list(VideoReader(path))
    strided = list(VideoReader(path, stride=10))
    assert [f.index for f in strided] == list(range(0, len(every), 10))
    assert all(np.array_equal(s.image, every[s.index].image) and s.timestamp == every[s.index].timestamp for s in strided)


def test_header_that_lies_about_frame_count_is_read_to_the_end(tmp_path):
    data = bytearray(write_avi(tmp_path / "t.avi", 30).read_bytes())
    for chunk, offset in ((b"avih", 16), (b"strh", 32)):  # total frames (main header), length (stream header)
        at = data.find(chunk) + 8 + offset
        data[at : at + 4] = struct.pack("<I", 5)
    (tmp_path / "lie.avi").write_bytes(bytes(data))
    reader = VideoReader(tmp_path / "lie.avi")
    assert reader.info.claimed_frames == 5
    assert len(list(reader)) == 30 and reader.ended_early() is None


def test_truncated_video_gives_its_frames_and_a_note(tmp_path):
    source = require(VIDEOS / "intel_one-by-one-person-detection.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(source[: len(source) // 3])
    reader = VideoReader(tmp_path / "cut.mp4")
    frames = sum(1 for _ in reader)
    assert 0 < frames < 1394 and "header claims 1394" in reader.ended_early()


def test_empty_and_garbage_videos_are_read_errors(tmp_path):
    write_avi(tmp_path / "empty.avi", 0)
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x01" * 5000)
    (tmp_path / "zero.mkv").write_bytes(b"")
    for name, words in (("empty.avi", "no frames"), ("garbage.mp4", "cannot open"), ("zero.mkv", "empty")):
        with pytest.raises(ImageReadError, match=words):
            list(VideoReader(tmp_path / name))


def test_decoder_streams_frames_then_done_in_input_order(tmp_path):
    write_avi(tmp_path / "b.avi", 7)
    write_avi(tmp_path / "d.avi", 0)
    shutil.copy(require(SHARED_DATA / "tiff16/img2d.tif"), tmp_path / "a.tif")
    shutil.copy(tmp_path / "a.tif", tmp_path / "c.tif")
    items = expand_sources([str(tmp_path)])
    assert [i.file_name for i in items] == ["a.tif", "b.avi", "c.tif", "d.avi"]
    for workers in (0, 1):
        events = list(iter_decoded(items, workers=workers, prefetch=2, vid_stride=2))
        kinds = [(e.item.file_name, e.frame if isinstance(e, Decoded) else "done", isinstance(e, Decoded) and e.error)
                 for e in events]
        assert kinds == [("a.tif", None, None), ("b.avi", 0, None), ("b.avi", 2, None), ("b.avi", 4, None),
                         ("b.avi", 6, None), ("b.avi", "done", False), ("c.tif", None, None),
                         ("d.avi", None, "video has no frames (empty, truncated or corrupt)")]
        assert isinstance(events[5], InputDone) and events[5].frames == 4


def test_closing_the_stream_mid_video_stops_the_reader():
    path = require(VIDEOS / "arjun234_vtest.avi")
    stream = iter_decoded([InputItem(path, "v.avi")], workers=1, prefetch=2)
    assert next(stream).frame == 0 and next(stream).frame == 1
    stream.close()  # would hang if the reader thread stayed blocked on its full queue
    import threading

    assert not any(t.name == "segcli-video" and t.is_alive() for t in threading.enumerate())


def test_predict_mixed_folder_with_overlay_video(checkpoint, photos, tmp_path):  # noqa: F811
    folder = tmp_path / "in"
    (folder / "cam").mkdir(parents=True)
    shutil.copy(photos[0], folder / "photo.jpg")
    shutil.copy(require(VIDEOS / "again.mkv"), folder / "cam" / "again.mkv")
    out, overlay = tmp_path / "p.jsonl", tmp_path / "overlay"
    summary = run_predict(PredictOptions(sources=[str(folder)], out=str(out), weights=str(checkpoint), device="cpu",
                                         score_thr=0.05, max_det=5, vid_stride=25, overlay=str(overlay),
                                         progress=False))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    frames = [line for line in lines if line["file"] == "cam/again.mkv"]
    assert [f["frame"] for f in frames] == [0, 25, 50, 75]
    assert [f["timestamp"] for f in frames] == pytest.approx([0.0, 25 / 30, 50 / 30, 75 / 30], abs=0.02)
    assert lines[-1]["file"] == "photo.jpg" and lines[-1]["frame"] is None
    assert summary.images == 1 and summary.frames == 4 and not summary.failures
    assert all(len(line["instances"]) <= 5 for line in lines)
    video = next((overlay / "cam").glob("again.*"))
    assert video.suffix in (".mp4", ".avi")
    drawn = opencv_frames(video)
    assert len(drawn) == 4 and drawn[0].shape == (480, 640, 3)
    picture = cv2.imread(str(overlay / "photo.jpg"))
    assert picture.shape[:2] == cv2.imread(str(photos[0])).shape[:2]
    assert not list(overlay.rglob("*.tmp*"))  # no temporary left behind
