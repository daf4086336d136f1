"""Read any image file a user may point us at into one predictable array: HxWx3 uint8 RGB.

Every failure is an `ImageReadError` carrying a short human reason, so that a folder with one bad
file costs one line in the report, never a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 20_000 * 20_000
"""Largest image (width * height) `read_image` decodes by default; checked from the header,
before decoding (a decompression bomb: a small file whose header claims a huge image)."""
MAX_PIXELS_ENV = "SEGCLI_MAX_PIXELS"
"""Environment variable that raises (or lowers) that limit, for slide scans and orthophotos."""

# Pillow refuses images above 2 * Image.MAX_IMAGE_PIXELS (about 179 M pixels by default) on open,
# which is stricter than our documented limit and would turn a 15000x15000 slide scan into an
# error. We own the limit (checked from the header below), so raise Pillow's to match; never lower
# it, and leave it disabled (None) if someone disabled it.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HIGH_DEPTH_GREY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class ImageReadError(Exception):
    """An input file that could not be read as an image; `reason` is short and human."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode `path` into a writable, C-contiguous HxWx3 uint8 RGB array, or raise `ImageReadError`.

    Promises:
    - EXIF orientation (all 8 values) is applied, so the array is the image as a viewer shows it.
    - Grey (1, L), LA, palette (P, PA), RGBA (alpha dropped), CMYK and YCbCr become RGB.
    - Data deeper than 8 bits (16-bit grey ``I;16*``, 32-bit ``I``, float ``F``, 16-bit RGB(A) PNG
      and TIFF) is mapped to 0..255 by a *linear min-max stretch* of the image's own range: the
      darkest pixel becomes 0 and the brightest 255 (all channels share one range, so colour
      balance is kept; non-finite floats become 0). Microscopy 16-bit images typically use a small
      part of the 0..65535 range, and dividing by 257 would make them black. A constant image
      becomes all 0.
    - Images over `max_pixels()` (MAX_PIXELS, or `SEGCLI_MAX_PIXELS`) are refused from their
      header size, before any pixel is decoded.
      (Files Pillow cannot identify are handed to OpenCV, whose own limit, 2**30 pixels, applies.)
    - Never raises anything but `ImageReadError` for a bad file; truncated files are errors (we do
      not set ``ImageFile.LOAD_TRUNCATED_IMAGES``: half a photo would give silently wrong masks).
    """
    path = Path(path)
    check_regular_file(path)
    try:
        with open(path, "rb") as handle:
            return _read_open_file(path, handle)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(path, "out of memory while decoding") from None
    except OSError as exc:
        # Only raised by open() or by a real I/O error; decoder errors are mapped further down.
        raise ImageReadError(path, _os_reason(exc)) from None


def check_regular_file(path: Path) -> None:
    """Raise ImageReadError unless `path` is a non-empty regular file (follows symlinks)."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ImageReadError(path, _os_reason(exc)) from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageReadError(path, "is a directory")
    if not stat.S_ISREG(info.st_mode):
        # Opening a FIFO or a device would block or read forever.
        raise ImageReadError(path, "not a regular file")
    if info.st_size == 0:
        raise ImageReadError(path, "file is empty")


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT:
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return f"read error ({exc.strerror or exc})"


def max_pixels() -> int:
    """The pixel limit: `SEGCLI_MAX_PIXELS` (a positive whole number; `_` separators allowed), else
    MAX_PIXELS. UsageError for another value: `segcli predict` checks it before any work."""
    from segcli.errors import UsageError

    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(f"{MAX_PIXELS_ENV}={text!r}: expected a positive whole number of pixels "
                         f"(width x height; the default is {MAX_PIXELS:_})")
    return value


def _read_open_file(path: Path, handle) -> np.ndarray:
    limit = max_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit  # Pillow's own bomb check must not be stricter than ours
    png = _png_header(handle)
    if png is not None:
        width, height, bit_depth, colour_type = png
        _check_size(path, width, height)
        # Pillow reads 16-bit colour PNGs (types 2, 4, 6) by keeping the high byte of each sample,
        # which ignores our depth rule; OpenCV keeps all 16 bits.
        if bit_depth == 16 and colour_type in (2, 4, 6):
            return _read_with_opencv(path, orientation=1)
    handle.seek(0)
    try:
        image = Image.open(handle)
    except UnidentifiedImageError:
        return _read_with_opencv(path, orientation=1, unidentified=True)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, _bomb_reason(str(exc))) from None
    except MemoryError:
        raise
    except Exception:  # any header parser failure on foreign data is a bad file, not our bug
        raise ImageReadError(path, "truncated or corrupt image data") from None
    with image:
        _check_size(path, *image.size)
        if _is_deep_colour_tiff(image):
            # Same high-byte truncation as for PNG above; OpenCV keeps the full depth.
            return _read_with_opencv(path, orientation=_exif_orientation(image))
        return _decode_with_pillow(path, image)


def _png_header(handle) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, or None if not a PNG."""
    head = handle.read(26)
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", head[16:26])
    return width, height, bit_depth, colour_type


def _check_size(path: Path, width: int, height: int) -> None:
    limit = max_pixels()
    if width * height > limit:
        # Say how to go on: the limit guards against decompression bombs, not against real scans.
        raise ImageReadError(path, f"image too large ({width}x{height} pixels; the limit is {limit:_}: "
                                   f"set {MAX_PIXELS_ENV} to raise it)")
    if width == 0 or height == 0:
        raise ImageReadError(path, f"image has no pixels ({width}x{height})")


def _bomb_reason(message: str) -> str:
    # Pillow only says how many pixels; only reached for non-PNG files over 2 * MAX_PIXELS.
    found = re.search(r"\((\d+) pixels\)", message)
    hint = f"set {MAX_PIXELS_ENV} to raise the limit"
    return f"image too large ({found.group(1)} pixels; {hint})" if found else f"image too large ({hint})"


def _is_deep_colour_tiff(image: Image.Image) -> bool:
    if image.format != "TIFF" or image.mode in _HIGH_DEPTH_GREY_MODES:
        return False
    bits = getattr(image, "tag_v2", {}).get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not cost the image: assume upright
        return 1


def _decode_with_pillow(path: Path, image: Image.Image) -> np.ndarray:
    try:
        image.load()
    except OSError as exc:
        if exc.errno is not None:  # a real read error, not a decoder complaint
            raise ImageReadError(path, _os_reason(exc)) from None
        if "decoder" in str(exc) and "not available" in str(exc):
            raise ImageReadError(path, f"unsupported image format ({image.format})") from None
        raise ImageReadError(path, "truncated or corrupt image data") from None
    except MemoryError:
        raise
    except Exception:  # Pillow's decoders raise assorted types on broken data
        raise ImageReadError(path, "truncated or corrupt image data") from None
    image = _exif_transpose(image)
    if image.mode in _HIGH_DEPTH_GREY_MODES:
        grey = _stretch_to_uint8(np.asarray(image))
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except ValueError:
            raise ImageReadError(path, f"unsupported pixel format ({image.mode})") from None
    return np.array(image, dtype=np.uint8, order="C")


def _exif_transpose(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF: keep the pixels, lose only the rotation
        return image


def quiet_opencv():
    """cv2, with its own log silenced: its decoders print `[ERROR] TIFFReadDirectory...` and
    `[WARN] VIDEOIO...` lines to stderr for files that segcli already reports in one line."""
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


def _read_with_opencv(path: Path, orientation: int, unidentified: bool = False) -> np.ndarray:
    """Decode with OpenCV (full bit depth), convert BGR(A) to RGB and apply the depth rule."""
    cv2 = quiet_opencv()  # imported here: only needed for the rare files Pillow cannot handle

    try:
        data = np.fromfile(path, dtype=np.uint8)
        array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        array = None
    if array is None:
        reason = "not an image (cannot identify format)" if unidentified else "truncated or corrupt image data"
        raise ImageReadError(path, reason)
    return _apply_orientation(_opencv_to_rgb8(array), orientation)


def _opencv_to_rgb8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.shape[2] == 2:  # grey + alpha
        array = np.repeat(array[:, :, :1], 3, axis=2)
    else:
        array = array[:, :, 2::-1]  # BGR or BGRA -> RGB, alpha dropped
    if array.dtype != np.uint8:
        array = _stretch_to_uint8(array)
    return np.ascontiguousarray(array)


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Numpy equivalent of `ImageOps.exif_transpose` for an EXIF orientation value 1..8."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, k=1),
    }
    transform = transforms.get(orientation)
    return array if transform is None else np.ascontiguousarray(transform(array))


def _stretch_to_uint8(array: np.ndarray) -> np.ndarray:
    """Linear min-max stretch of any numeric array to uint8 (see `read_image`)."""
    if array.dtype.kind in "ui" and array.dtype.itemsize <= 2:
        # A 65536-entry lookup table: no float copy of a possibly large image.
        array = array.astype(np.uint16, copy=False)
        low, high = int(array.min()), int(array.max())
        if high <= low:
            return np.zeros(array.shape, np.uint8)
        levels = np.arange(65536, dtype=np.float64)
        table = np.clip(np.rint((levels - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
        return table[array]
    finite = np.isfinite(array) if array.dtype.kind == "f" else None
    valid = array if finite is None else array[finite]
    if valid.size == 0:
        return np.zeros(array.shape, np.uint8)
    low, high = float(valid.min()), float(valid.max())
    if not high > low:
        return np.zeros(array.shape, np.uint8)
    # float32 halves the temporary of a huge image; 24 bits of precision are plenty for 8-bit output.
    values = (array.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    if finite is not None:
        values[~finite] = 0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
