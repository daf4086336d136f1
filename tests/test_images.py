"""read_image on real and synthetic files, and iter_decoded's ordering, errors and early close."""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segcli.data import decode
from segcli.data.decode import Decoded, iter_decoded
from segcli.data.images import ImageReadError, _apply_orientation, read_image
from segcli.data.sources import InputItem

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO_IMAGES = DATA / "coco_tiny" / "images" / "val2017"
TIFF16 = DATA / "tiff16" / "img2d.tif"


def _real_jpeg() -> Path:
    jpegs = sorted(COCO_IMAGES.glob("*.jpg")) if COCO_IMAGES.is_dir() else []
    if not jpegs:
        pytest.skip(f"real data not found under {COCO_IMAGES}")
    return jpegs[0]


def _assert_rgb8(array: np.ndarray, height: int, width: int) -> None:
    assert array.shape == (height, width, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous and array.flags.writeable


def _reason(path: Path) -> str:
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert caught.value.path == path
    assert str(caught.value) == f"{path}: {caught.value.reason}"
    return caught.value.reason


# --- real files ------------------------------------------------------------------------------


def test_real_jpeg_decodes_to_its_size():
    path = _real_jpeg()
    width, height = Image.open(path).size
    image = read_image(path)
    _assert_rgb8(image, height, width)
    assert image.std() > 10  # a photo, not a blank


def test_real_16bit_tiff_is_stretched_not_black():
    if not TIFF16.is_file():
        pytest.skip(f"real data not found: {TIFF16}")
    assert Image.open(TIFF16).mode.startswith("I;16")
    image = read_image(TIFF16)
    _assert_rgb8(image, 512, 512)
    assert image.max() > 100
    assert image.min() == 0 and image.max() == 255  # min-max stretch uses the full range
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


# --- EXIF orientation --------------------------------------------------------------------------

# What a viewer shows for each EXIF orientation of the stored pixels `a` (HxWxC).
EXPECTED_ORIENTATION = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, k=-1),  # stored rotated 90 counter-clockwise: turn clockwise
    7: lambda a: np.rot90(a, k=-1)[::-1],  # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, k=1),  # turn counter-clockwise
}


def _asymmetric() -> np.ndarray:
    # 3x4, every pixel distinct, so any wrong flip or rotation shows.
    return (np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3) * 7).copy()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    pixels = _asymmetric()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"  # PNG: lossless, so pixels compare exactly
    Image.fromarray(pixels).save(path, exif=exif)
    result = read_image(path)
    expected = EXPECTED_ORIENTATION[orientation](pixels)
    np.testing.assert_array_equal(result, expected)


def test_exif_orientation_on_jpeg_swaps_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (40, 20), (200, 30, 30)).save(path, exif=exif)
    _assert_rgb8(read_image(path), 40, 20)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_numpy_orientation_matches_expected(orientation):
    # The OpenCV fallback applies orientation with numpy; it must agree with Pillow's meaning.
    pixels = _asymmetric()
    np.testing.assert_array_equal(_apply_orientation(pixels, orientation), EXPECTED_ORIENTATION[orientation](pixels))


# --- pixel formats -----------------------------------------------------------------------------


def test_grey_and_bilevel(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    result = read_image(tmp_path / "g.png")
    _assert_rgb8(result, 3, 4)
    np.testing.assert_array_equal(result, np.repeat(grey[:, :, None], 3, axis=2))

    Image.fromarray(grey > 100).save(tmp_path / "b.png")  # mode "1"
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[..., 0], np.where(grey > 100, 255, 0))


def test_grey_alpha_and_rgba_drop_alpha(tmp_path):
    rgb = _asymmetric()
    alpha = np.full((3, 4), 10, np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)

    grey = rgb[..., 0]
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), np.repeat(grey[:, :, None], 3, axis=2))


def test_palette_images(tmp_path):
    rgb = _asymmetric()
    palette_image = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    palette_image.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expected)

    palette_image.info["transparency"] = 0
    palette_image.save(tmp_path / "pt.png")
    _assert_rgb8(read_image(tmp_path / "pt.png"), 3, 4)

    pa = Image.new("PA", (4, 3))
    pa.putpalette([255, 0, 0] * 256)
    pa.save(tmp_path / "pa.tif")  # written via PA mode; reading must never fail on it
    _assert_rgb8(read_image(tmp_path / "pa.tif"), 3, 4)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    result = read_image(tmp_path / "cmyk.jpg")
    _assert_rgb8(result, 6, 8)
    red, green, blue = result.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_16bit_grey_png_is_min_max_stretched(tmp_path):
    values = np.array([[1000, 2000], [3000, 2000]], dtype=np.uint16)  # a small part of 0..65535
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    result = read_image(tmp_path / "g16.png")
    _assert_rgb8(result, 2, 2)
    np.testing.assert_array_equal(result[..., 0], [[0, 128], [255, 128]])


def test_constant_16bit_image_becomes_zero(tmp_path):
    Image.fromarray(np.full((3, 3), 4000, np.uint16)).save(tmp_path / "flat.png")
    assert read_image(tmp_path / "flat.png").max() == 0


def test_16bit_rgb_png_keeps_depth_and_channel_order(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint16)
    rgb[0, 0] = (1000, 0, 0)  # red, in RGB terms
    rgb[1, 2] = (0, 0, 500)  # half-bright blue
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[..., ::-1])  # OpenCV writes BGR
    result = read_image(tmp_path / "rgb16.png")
    _assert_rgb8(result, 2, 3)
    assert tuple(result[0, 0]) == (255, 0, 0)  # Pillow alone would give (3, 0, 0)
    assert tuple(result[1, 2]) == (0, 0, 128)


def test_16bit_rgba_png_drops_alpha(tmp_path):
    bgra = np.zeros((2, 2, 4), np.uint16)
    bgra[0, 0] = (0, 0, 800, 65535)
    bgra[..., 3] = 65535
    cv2.imwrite(str(tmp_path / "rgba16.png"), bgra)
    result = read_image(tmp_path / "rgba16.png")
    _assert_rgb8(result, 2, 2)
    assert tuple(result[0, 0]) == (255, 0, 0)


def test_16bit_rgb_tiff(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint16)
    rgb[1, 1] = (0, 300, 0)
    cv2.imwrite(str(tmp_path / "rgb16.tif"), rgb[..., ::-1])
    assert tuple(read_image(tmp_path / "rgb16.tif")[1, 1]) == (0, 255, 0)


def test_32bit_int_and_float_tiffs(tmp_path):
    ints = np.array([[-5, 0], [5, 5]], dtype=np.int32)
    Image.fromarray(ints, "I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "i.tif")[..., 0], [[0, 128], [255, 255]])

    floats = np.array([[0.5, np.nan], [1.5, 1.0]], dtype=np.float32)
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif")[..., 0], [[0, 0], [255, 128]])


# --- bad files ---------------------------------------------------------------------------------


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _reason(tmp_path / "empty.jpg") == "file is empty"


def test_text_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not pixels\n" * 10)
    assert _reason(tmp_path / "notes.jpg") == "not an image (cannot identify format)"


def test_missing_file_and_folder(tmp_path):
    assert _reason(tmp_path / "gone.jpg") == "no such file"
    (tmp_path / "folder.jpg").mkdir()
    assert _reason(tmp_path / "folder.jpg") == "is a directory"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(path)
    path.chmod(0)
    try:
        assert _reason(path) == "permission denied"
    finally:
        path.chmod(0o644)


def test_truncated_jpeg(tmp_path):
    data = _real_jpeg().read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    assert _reason(tmp_path / "half.jpg") == "truncated or corrupt image data"


def test_truncated_png(tmp_path):
    full = tmp_path / "full.png"
    Image.open(_real_jpeg()).save(full)
    data = full.read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    assert _reason(tmp_path / "half.png") == "truncated or corrupt image data"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_huge_png_refused_from_header(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr))
    assert _reason(tmp_path / "bomb.png") == ("image too large (100000x100000 pixels; the limit is 400_000_000: "
                                              "set SEGCLI_MAX_PIXELS to raise it)")


def test_huge_bmp_refused(tmp_path):
    info = struct.pack("<IiiHHIIiiII", 40, 100_000, 100_000, 1, 24, 0, 0, 0, 0, 0, 0)
    header = b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info))
    (tmp_path / "bomb.bmp").write_bytes(header + info)
    assert _reason(tmp_path / "bomb.bmp").startswith("image too large (")


# --- iter_decoded ------------------------------------------------------------------------------


def _items(tmp_path: Path, count: int, bad: set[int]) -> list[InputItem]:
    items = []
    for index in range(count):
        path = tmp_path / f"{index:03d}.png"
        if index in bad:
            path.write_text("not an image")
        else:
            Image.new("L", (index + 1, 2), index).save(path)
        items.append(InputItem(path, path.name))
    return items


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_iter_decoded_keeps_order_and_reports_errors(tmp_path, workers):
    items = _items(tmp_path, 12, bad={3, 7}) + [InputItem(tmp_path / "missing.png", "missing.png")]
    results = list(iter_decoded(items, workers=workers, prefetch=4))
    assert [r.index for r in results] == list(range(13))
    assert [r.item for r in results] == items
    for result in results:
        if result.index in (3, 7):
            assert result.image is None and result.error == "not an image (cannot identify format)"
        elif result.index == 12:
            assert result.image is None and result.error == "no such file"
        else:
            assert result.error is None and result.image.shape == (2, result.index + 1, 3)


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("segcli-decode")]


def test_iter_decoded_bounds_work_ahead_and_closes_early(monkeypatch):
    started: list[int] = []

    def fake_read(path: Path) -> np.ndarray:
        started.append(int(path.name))
        time.sleep(0.002)
        return np.zeros((1, 1, 3), np.uint8)

    monkeypatch.setattr(decode, "read_image", fake_read)
    items = [InputItem(Path(str(i)), str(i)) for i in range(1000)]
    stream = iter_decoded(items, workers=2, prefetch=5)
    first = next(stream)
    assert isinstance(first, Decoded) and first.index == 0
    time.sleep(0.1)  # a slow consumer: the pool must stop at `prefetch` ahead
    assert len(started) <= 1 + 5
    began = time.monotonic()
    stream.close()
    assert time.monotonic() - began < 2
    assert len(started) <= 1 + 5
    assert not _decode_threads()


def test_iter_decoded_break_in_consumer_shuts_pool_down(tmp_path):
    items = _items(tmp_path, 6, bad=set())
    for result in iter_decoded(items, workers=2, prefetch=2):
        if result.index == 1:
            break
    # The generator is closed when the loop drops it (CPython refcounting).
    assert not _decode_threads()


def test_iter_decoded_rejects_bad_arguments():
    with pytest.raises(ValueError):
        list(iter_decoded([], workers=-1))
    with pytest.raises(ValueError):
        list(iter_decoded([], prefetch=0))
