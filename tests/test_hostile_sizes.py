"""Hostile image sizes through `segcli predict` (the shipped demo model): 1 x 1, 1 x N, N x 1,
65535 x 1, a PNG whose header claims 30000 x 30000 (the decompression-bomb guard, and
SEGCLI_MAX_PIXELS to move it), a video with 0 frames. Each bad input is one warning line, the run
exits 1, no traceback, and every other input is still predicted."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import ROOT, synthetic_shapes


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


# `python -m segcli`, which also writes its peak resident memory (kB) to $PEAK_FILE as it exits.
MEASURED = ("import atexit, os, resource, runpy, sys\n"
            "atexit.register(lambda: open(os.environ['PEAK_FILE'], 'w').write(\n"
            "    str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
            "sys.argv = ['segcli', *sys.argv[1:]]\n"
            "runpy.run_module('segcli', run_name='__main__')\n")


def predict(*args: str, env: dict | None = None, peak: Path | None = None) -> subprocess.CompletedProcess:
    command = ["-c", MEASURED] if peak is not None else ["-m", "segcli"]
    extra = {"PEAK_FILE": str(peak)} if peak is not None else {}
    return subprocess.run([sys.executable, *command, "predict", *args, "--weights", "shapes_demo",
                           "--device", "cpu", "--workers", "0", "--max-det", "5"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT), **extra, **(env or {})})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(22)
    shapes = synthetic_shapes()
    image, _ = shapes.make_image(rng, 256)
    cv2.imwrite(str(folder / "shapes.png"), image[:, :, ::-1])
    for name, (height, width) in {"1x1.png": (1, 1), "1x9.png": (9, 1), "9x1.png": (1, 9),
                                  "1x3000.png": (3000, 1), "65535x1.png": (1, 65535), "3x65535.png": (65535, 3)}.items():
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    (folder / "bomb 30000x30000.png").write_bytes(_png_claiming(30000, 30000))
    writer = cv2.VideoWriter(str(folder / "noframes.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    writer.release()
    return folder


GOOD = {"shapes.png": (256, 256), "1x1.png": (1, 1), "1x9.png": (1, 9), "9x1.png": (9, 1),
        "1x3000.png": (1, 3000), "65535x1.png": (65535, 1), "3x65535.png": (3, 65535)}


def test_extreme_sizes_are_predicted_and_bombs_are_one_line(inputs, tmp_path):
    out = tmp_path / "out.jsonl"
    result = predict(str(inputs), "--out", str(out), peak=tmp_path / "peak")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, warnings
    bomb = next(line for line in warnings if "bomb 30000x30000.png" in line)
    assert "image too large (30000x30000 pixels; the limit is 400_000_000: set SEGCLI_MAX_PIXELS to raise it)" in bomb
    assert any("noframes.avi: video has no frames" in line for line in warnings)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["file"]: (r["width"], r["height"]) for r in records} == GOOD
    shapes = next(r for r in records if r["file"] == "shapes.png")
    assert shapes["instances"], "the demo model finds the shapes"
    for record in records:  # whatever was found lies inside its image, its mask of the image's size
        for instance in record["instances"]:
            x, y, w, h = instance["bbox"]
            assert 0 <= x <= x + w <= record["width"] + 0.01 and 0 <= y <= y + h <= record["height"] + 0.01
            assert instance["segmentation"]["size"] == [record["height"], record["width"]]
    # Peak memory: the hostile inputs cost no more than a little over one ordinary image's run (the
    # bomb is refused from its header, a 65535-pixel line is resized like any image).
    ordinary = predict(str(inputs / "shapes.png"), "--out", str(tmp_path / "one.jsonl"), peak=tmp_path / "peak1")
    assert ordinary.returncode == 0, ordinary.stderr[-3000:]
    hostile_mb, ordinary_mb = (int((tmp_path / name).read_text()) / 1024 for name in ("peak", "peak1"))
    print(f"\npeak resident memory: hostile inputs {hostile_mb:.0f} MB, one ordinary image {ordinary_mb:.0f} MB",
          file=sys.stderr)
    assert hostile_mb < ordinary_mb + 300, (hostile_mb, ordinary_mb)


def test_the_pixel_limit_moves_with_segcli_max_pixels(inputs, tmp_path):
    # Lowered: a 256 x 256 image is then too large, said in one line; the small ones still run.
    out = tmp_path / "low.jsonl"
    result = predict(str(inputs / "shapes.png"), str(inputs / "1x9.png"), "--out", str(out),
                     env={"SEGCLI_MAX_PIXELS": "10_000"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "image too large (256x256 pixels; the limit is 10_000" in warnings[0]
    assert [Path(json.loads(line)["file"]).name for line in out.read_text().splitlines()] == ["1x9.png"]
    # Raised: the 30000 x 30000 header passes the guard, and the file is what it is (a tiny IDAT).
    result = predict(str(inputs / "bomb 30000x30000.png"), "--out", str(tmp_path / "high.jsonl"),
                     env={"SEGCLI_MAX_PIXELS": "1000000000"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "truncated or corrupt" in warnings[0], warnings
    # Not a number: one usage error before any work, nothing written.
    for value in ("lots", "0", "-5", "1e9"):
        result = predict(str(inputs / "1x1.png"), "--out", str(tmp_path / "bad.jsonl"), env={"SEGCLI_MAX_PIXELS": value})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
        assert lines[0].startswith(f"segcli: error: SEGCLI_MAX_PIXELS={value!r}: expected a positive whole number")
        assert not (tmp_path / "bad.jsonl").exists()


def _video_changing_size(path: Path) -> None:
    """An MPEG-TS stream whose frames change from 320x240 to 200x120 mid-stream, as concatenated
    recordings (`cat a.ts b.ts`) and some cameras after a resolution switch give."""
    av = pytest.importorskip("av")
    parts = []
    for k, (width, height) in enumerate([(320, 240), (200, 120)]):
        part = path.with_name(f"part{k}.ts")
        container = av.open(str(part), "w", format="mpegts")
        stream = container.add_stream("mpeg2video", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(8):
            frame = np.full((height, width, 3), 40, np.uint8)
            cv2.rectangle(frame, (10 + 4 * i, 10), (70 + 4 * i, 70), (240, 200, 30), -1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
        container.close()
        parts.append(part.read_bytes())
    path.write_bytes(b"".join(parts))


def test_a_video_whose_frames_change_size_mid_stream(tmp_path):
    video = tmp_path / "switch.m2ts"
    _video_changing_size(video)
    out = tmp_path / "v.jsonl"
    result = predict(str(video), "--out", str(out), "--vid-stride", "1")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # OpenCV scales the later frames to the stream's first size, so every record, box and mask is
    # in one pixel grid, the video's (that of its header).
    assert len(records) >= 14 and {(r["width"], r["height"]) for r in records} == {(320, 240)}
    for record in records:
        for instance in record["instances"]:
            x, y, w, h = instance["bbox"]
            assert 0 <= x <= x + w <= 320.01 and 0 <= y <= y + h <= 240.01
            assert instance["segmentation"]["size"] == [240, 320]
