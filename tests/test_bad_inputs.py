"""One run of `segcli predict` over 30+ hostile or unusual inputs mixed with good ones: every bad
input costs exactly one warning line naming it and the reason, every good one is predicted, no
traceback, exit code 1."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tests.conftest import SHARED_DATA, require
from tests.test_predict_cli import photos  # noqa: F401  (fixture)
from tests.test_resume import checkpoint  # noqa: F401  (fixture: the small model at 160 px)

ROOT = Path(__file__).resolve().parents[1]


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (one tiny IDAT: the size check must come first)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _jpeg_claiming(source: bytes, width: int, height: int) -> bytes:
    data = bytearray(source)
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def build(folder: Path, photos) -> tuple[dict[str, str], dict[str, tuple[int, int]], list[str]]:  # noqa: F811
    """Create the inputs; returns (bad name -> words of its reason, good name -> (width, height),
    the extra SOURCE arguments)."""
    folder.mkdir()
    jpeg = photos[0].read_bytes()
    png_bytes = (folder / "tmp.png")
    Image.open(photos[1]).crop((0, 0, 96, 64)).save(png_bytes)
    png = png_bytes.read_bytes()
    png_bytes.unlink()
    bad: dict[str, str] = {}
    good: dict[str, tuple[int, int]] = {}

    def write(name: str, data: bytes, reason: str | None = None, size: tuple[int, int] | None = None) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if reason is not None:
            bad[name] = reason
        if size is not None:
            good[name] = size
        return path

    # Broken images.
    write("truncated.jpg", jpeg[:3000], "truncated or corrupt")
    write("corrupt header.jpg", jpeg[:2] + os.urandom(64) + jpeg[66:], "")
    write("truncated.png", png[: len(png) // 2], "truncated or corrupt")
    idat = png.index(b"IDAT") + 4
    write("corrupt.png", png[:idat] + b"\x00" * 40 + png[idat + 40 :], "truncated or corrupt")
    write("empty.jpg", b"", "file is empty")
    write("text.jpg", b"this is not a picture\n" * 10, "not an image")
    write("huge.png", _png(100_000, 100_000), "image too large (100000x100000")
    write("huge.jpg", _jpeg_claiming(jpeg, 65000, 65000), "image too large")
    write("html.png", b"<html><body>404 Not Found</body></html>", "not an image")
    write("truncated.webp", (lambda b: b[: len(b) // 3])(_encoded(photos[0], ".webp")), "truncated or corrupt")
    write("truncated.bmp", (lambda b: b[: len(b) // 2])(_encoded(photos[0], ".bmp")), "")
    write("corrupt.tif", b"II*\x00" + os.urandom(200), "")
    write("zeros.jpg", b"\x00" * 5000, "not an image")
    # Broken videos.
    cut = require(SHARED_DATA / "videos/intel_one-by-one-person-detection.mp4").read_bytes()
    write("garbage.mp4", os.urandom(20000), "cannot open as a video")
    write("zero.mkv", b"", "file is empty")
    writer = cv2.VideoWriter(str(folder / "noframes.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    writer.release()
    bad["noframes.avi"] = "video has no frames"
    write("text.mov", b"not a movie at all\n" * 100, "cannot open as a video")
    # Unusual but valid images: each must be predicted.
    Image.new("CMYK", (120, 80), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    good["cmyk.jpg"] = (120, 80)
    grey16 = (np.arange(64 * 96, dtype=np.uint32).reshape(64, 96) * 9 % 65536).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    good["grey16.png"] = (96, 64)
    cv2.imwrite(str(folder / "rgb16.png"), np.repeat(grey16[:, :, None], 3, axis=2))
    good["rgb16.png"] = (96, 64)
    shutil.copy(require(SHARED_DATA / "tiff16/img2d.tif"), folder / "microscopy16.tif")
    good["microscopy16.tif"] = (512, 512)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.open(photos[2]).crop((0, 0, 120, 80)).save(folder / f"exif{orientation}.jpg", exif=exif)
        good[f"exif{orientation}.jpg"] = (80, 120) if orientation >= 5 else (120, 80)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one pixel.png")
    good["one pixel.png"] = (1, 1)
    shutil.copy(photos[3], folder / "name with spaces.jpg")
    shutil.copy(photos[4], folder / "ñandú 写真.jpg")
    for name, photo in (("name with spaces.jpg", photos[3]), ("ñandú 写真.jpg", photos[4])):
        good[name] = Image.open(photo).size
    shutil.copy(require(SHARED_DATA / "videos/again.mkv"), folder / "clip.mkv")
    good["clip.mkv"] = (640, 480)
    # A truncated video: its frames up to the cut are predicted, with a note (not a failure).
    write("cut.mp4", cut[: len(cut) // 3], size=(768, 432))
    # Symlinks: a folder loop (walked once, no duplicates), a file linked to itself.
    (folder / "sub").mkdir()
    shutil.copy(photos[5], folder / "sub" / "deep.jpg")
    good["sub/deep.jpg"] = Image.open(photos[5]).size
    os.symlink("..", folder / "sub" / "loop")
    os.symlink("self.jpg", folder / "self.jpg")
    # Unreadable (root reads anything: then it is a good input).
    locked = write("locked.jpg", jpeg)
    locked.chmod(0)
    if _readable(locked):
        good["locked.jpg"] = Image.open(photos[0]).size
    else:
        bad["locked.jpg"] = "permission denied"
    # Named in a list: things a folder walk would not even list.
    (folder / "dir.jpg").mkdir()
    os.mkfifo(folder / "fifo.jpg")
    listing = folder.parent / "more.txt"
    listing.write_text("mixed/self.jpg\nmixed/missing.jpg\nmixed/dir.jpg\nmixed/fifo.jpg\n")
    for name, reason in (("self.jpg", "symlink loop"), ("missing.jpg", "no such file"), ("dir.jpg", "is a directory"),
                         ("fifo.jpg", "not a regular file")):
        bad[name] = reason
    return bad, good, [str(listing)]


def _encoded(photo: Path, extension: str) -> bytes:
    ok, data = cv2.imencode(extension, cv2.imread(str(photo)))
    assert ok
    return data.tobytes()


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except PermissionError:
        return False


def test_bad_inputs_mixed_with_good_ones(checkpoint, photos, tmp_path):  # noqa: F811
    bad, good, extra = build(tmp_path / "mixed", photos)
    assert len(bad) >= 20 and len(bad) + len(good) >= 40
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "segcli", "predict", str(tmp_path / "mixed"), *extra, "--out", str(out),
         "--weights", str(checkpoint), "--vid-stride", "150", "--max-det", "3", "--score-thr", "0.05"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "[h264" not in result.stderr and "[mjpeg" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # Nothing but our own lines: no decoder chatter from OpenCV, FFmpeg or Pillow.
    assert all(line.startswith(("warning: ", "segcli: ", "  ")) for line in lines), lines
    warnings = [line for line in lines if line.startswith("warning:")]
    for name, words in bad.items():
        mine = [line for line in warnings if line.startswith("warning: skipped ") and f"{name}: " in line]
        assert len(mine) == 1, (name, warnings)
        assert words in mine[0], (name, mine[0])
    notes = [line for line in warnings if "cut.mp4" in line]
    assert len(notes) == 1 and "header claims 1394" in notes[0]
    assert len(warnings) == len(bad) + 1  # nothing else warned about
    assert f"{len(bad)} inputs failed" in result.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    seen: dict[str, tuple[int, int]] = {}
    for line in lines:
        seen.setdefault(line["file"], (line["width"], line["height"]))
    assert seen == good  # every good input, with its displayed size (EXIF applied); no bad one
    assert [line["frame"] for line in lines if line["file"] == "clip.mkv"] == [0]
    assert [line["frame"] for line in lines if line["file"] == "cut.mp4"] == [0, 150, 300, 450][: len(
        [line for line in lines if line["file"] == "cut.mp4"])]
    assert len([1 for line in lines if line["file"] == "sub/deep.jpg"]) == 1  # the loop listed it once
