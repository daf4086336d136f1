"""Where a georeferenced TIFF lies: its coordinate reference system and its pixel-to-map transform.

Read from the file's header with rasterio (GDAL), the optional extra `segcli[geo]`. GDAL's
geotransform maps the top-left corner of the top-left pixel, which is segcli's image coordinate
(0, 0) (the image spans [0, W] x [0, H]), so a polygon vertex (x, y) lies at the map point
`(a*x + b*y + c, d*x + e*y + f)`, rotated rasters included. GDAL also turns a PixelIsPoint
raster's tie point into that corner convention.

Without rasterio, a TIFF that carries GeoTIFF tags is noticed with Pillow and reported once: its
coordinates stay pixels. Only TIFFs are looked at (world files beside JPEGs and PNGs are not).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

GEO_SUFFIXES = (".tif", ".tiff")
_GEOTIFF_TAGS = (33550, 33922, 34264)  # ModelPixelScale, ModelTiepoint, ModelTransformation
_ORIENTATION_TAG = 0x0112
CRS84 = "urn:ogc:def:crs:OGC:1.3:CRS84"


@dataclass(frozen=True)
class GeoReference:
    """`crs` as GeoJSON's `crs` member names it (what GDAL's GeoJSON driver reads and writes):
    `urn:ogc:def:crs:EPSG::<code>`, CRS84 for WGS 84 (longitude first), or the CRS's WKT when it
    has no EPSG code. `transform`: the affine (a, b, c, d, e, f) from pixel to map coordinates."""

    crs: str
    transform: tuple[float, float, float, float, float, float]

    def as_record(self) -> dict:
        """The `geo` member of a record (segcli.writers.records), stored in the resume journal."""
        return {"crs": self.crs, "transform": list(self.transform)}


class GeoReader:
    """Reads the georeference of TIFF inputs; `warn` hears once that rasterio is missing."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self._warn = warn
        self._warned = False

    def read(self, path: Path, width: int, height: int) -> GeoReference | None:
        """The georeference of the TIFF at `path`, decoded as a `width` x `height` image; None for
        other files, TIFFs without a CRS and geotransform (GCPs or RPCs only), files whose
        orientation tag turns the pixels (the decoded grid would not be GDAL's), and, without
        rasterio, every file."""
        if Path(path).suffix.lower() not in GEO_SUFFIXES or _orientation(path) != 1:
            return None
        try:
            import rasterio
        except ImportError:
            if not self._warned and _has_geotiff_tags(path):
                self._warned = True
                self._warn(f"'{path}' is georeferenced, but reading its coordinate system needs rasterio "
                           f"(pip install 'segcli[geo]'); GeoJSON coordinates stay pixels")
            return None
        with _quiet_gdal():
            try:
                with rasterio.open(path) as source:
                    crs, transform, size = source.crs, source.transform, (source.width, source.height)
            except (rasterio.errors.RasterioError, OSError):
                return None  # GDAL cannot read it; decoding reports the file if it is broken
        if crs is None or transform.is_identity or size != (width, height):
            return None
        return GeoReference(_crs_name(crs), tuple(float(v) for v in transform[:6]))


def _crs_name(crs) -> str:
    epsg = crs.to_epsg()
    if epsg == 4326:  # GeoJSON's own default, longitude first: how GDAL names WGS 84
        return CRS84
    return f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()


def _orientation(path: Path) -> int:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # files Pillow cannot read are decoded by OpenCV, upright (segcli.data.images)
        return 1


def _has_geotiff_tags(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            tags = getattr(image, "tag_v2", {})
            return any(tag in tags for tag in _GEOTIFF_TAGS)
    except Exception:
        return False


@contextlib.contextmanager
def _quiet_gdal():
    """GDAL's complaints (through rasterio's loggers and warnings) would print beside segcli's
    one line per bad input; a plain TIFF also raises NotGeoreferencedWarning."""
    logger = logging.getLogger("rasterio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
