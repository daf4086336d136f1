"""GeoTIFF in, GeoJSON in its CRS out: small GeoTIFFs written here with rasterio (a UTM zone north
up, the same rotated, WGS 84), predicted with the demo model, read back with rasterio and shapely."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from typer.testing import CliRunner

from segcli.cli import app
from segcli.writers.polygons import mask_geometry
from tests.conftest import SHARED_DATA, require, synthetic_shapes

rasterio = pytest.importorskip("rasterio")
from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import Affine  # noqa: E402

UTM_33N = "EPSG:32633"
NORTH_UP = Affine(0.5, 0, 500_000.0, 0, -0.5, 4_500_000.0)  # 0.5 m pixels, top-left corner at (500000, 4500000)
ROTATED = NORTH_UP @ Affine.rotation(30)
WGS84_DEGREES = Affine(1e-5, 0, 15.0, 0, -1e-5, 45.0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Two synthetic shapes images (HxWx3) and their ground-truth masks."""
    from pycocotools.coco import COCO

    root = tmp_path_factory.mktemp("shapes")
    annotations = synthetic_shapes().generate(root, images=2, size=256, seed=99)
    coco = COCO(str(annotations))
    images, masks = [], []
    for image in coco.dataset["images"]:
        import cv2

        images.append(cv2.imread(str(root / "images" / image["file_name"]))[..., ::-1])
        masks.append([coco.annToMask(a).astype(bool) for a in coco.imgToAnns[image["id"]]])
    return images, masks


def write_geotiff(path: Path, image: np.ndarray, crs: str, transform: Affine) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=image.shape[1], height=image.shape[0], count=3,
                       dtype="uint8", crs=crs, transform=transform, photometric="RGB") as out:
        out.write(np.moveaxis(image, 2, 0))
    return path


def predict(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["predict", *args, "--weights", "shapes_demo"])
    return result.exit_code, result.output


def map_geometry(mask: np.ndarray, transform: Affine) -> shapely.Geometry:
    """A ground-truth mask as a shapely geometry in map coordinates, mapped with rasterio's affine."""
    return shapely.affinity.affine_transform(mask_geometry(mask, 0.0), [transform.a, transform.b, transform.d,
                                                                        transform.e, transform.c, transform.f])


@pytest.mark.parametrize("crs, transform, name, reads_as", [
    (UTM_33N, NORTH_UP, "urn:ogc:def:crs:EPSG::32633", UTM_33N),
    (UTM_33N, ROTATED, "urn:ogc:def:crs:EPSG::32633", UTM_33N),
    # GeoJSON's WGS 84 is longitude first, as the raster's x axis is: CRS84, not EPSG:4326's lat/lon.
    ("EPSG:4326", WGS84_DEGREES, "urn:ogc:def:crs:OGC:1.3:CRS84", "OGC:CRS84"),
])
def test_geojson_of_a_geotiff_is_in_its_crs(tmp_path, shapes, crs, transform, name, reads_as):
    images, truth = shapes
    tif = write_geotiff(tmp_path / "scene.tif", images[0], crs, transform)
    code, output = predict(str(tif), "--out", str(tmp_path / "scene.geojson"), "--masks", "polygon")
    assert code == 0, output
    collection = json.loads((tmp_path / "scene.geojson").read_text())
    assert collection["crs"] == {"type": "name", "properties": {"name": name}}
    # GDAL's GeoJSON driver reads the name with OSRSetFromUserInput, as rasterio's CRS does.
    assert CRS.from_user_input(name) == CRS.from_user_input(reads_as)
    features = collection["features"]
    assert len(features) >= 3

    # Exactly the pixel polygons of a plain run, mapped by rasterio's affine.
    code, output = predict(str(tif), "--out", str(tmp_path / "pixels.jsonl"), "--masks", "polygon")
    assert code == 0, output
    instances = json.loads((tmp_path / "pixels.jsonl").read_text())["instances"]
    assert len(instances) == len(features)
    digits = 3 if crs == UTM_33N else 7
    for feature, instance in zip(features, instances):
        for mapped, pixels in zip(feature["geometry"]["coordinates"], instance["polygons"]):
            for ring, pixel_ring in zip(mapped, pixels):
                expected = [transform @ tuple(point) for point in pixel_ring]
                if transform.determinant < 0:
                    expected = expected[::-1]  # kept counter-clockwise (RFC 7946)
                assert np.allclose(ring, expected, atol=10 ** -digits, rtol=0)
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.is_valid and all(part.exterior.is_ccw for part in geometry.geoms)
        assert feature["properties"]["bbox"] == instance["bbox"]  # bbox and area stay in pixels

    # The shapes lie where the ground truth does on the map (the demo model may miss one).
    geometries = [shapely.geometry.shape(f["geometry"]) for f in features]
    found = 0
    for mask in truth[0]:
        expected = map_geometry(mask, transform)
        found += max(g.intersection(expected).area / g.union(expected).area for g in geometries) >= 0.7
    assert found >= max(2, len(truth[0]) - 1)
    frame = map_geometry(np.ones((256, 256), bool), transform)
    assert all(frame.contains(g.centroid) for g in geometries)


def test_plain_and_georeferenced_images_together_stay_in_pixels(tmp_path, shapes):
    images, _ = shapes
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_geotiff(folder / "a.tif", images[0], UTM_33N, NORTH_UP)
    import cv2

    cv2.imwrite(str(folder / "b.png"), images[1][..., ::-1])
    code, output = predict(str(folder), "--out", str(tmp_path / "mixed.geojson"))
    assert code == 0
    assert "one GeoJSON file holds one coordinate system, so all its coordinates are pixels" in output
    collection = json.loads((tmp_path / "mixed.geojson").read_text())
    assert "crs" not in collection
    assert all(0 <= x <= 256 and 0 <= y <= 256 for f in collection["features"]
               for part in f["geometry"]["coordinates"] for ring in part for x, y in ring)


def test_two_crs_in_one_output_stay_in_pixels(tmp_path, shapes):
    images, _ = shapes
    folder = tmp_path / "two"
    folder.mkdir()
    write_geotiff(folder / "a.tif", images[0], UTM_33N, NORTH_UP)
    write_geotiff(folder / "b.tif", images[1], "EPSG:32632", NORTH_UP)
    code, output = predict(str(folder), "--out", str(tmp_path / "two.geojson"))
    assert code == 0 and "2 coordinate systems" in output
    assert "crs" not in json.loads((tmp_path / "two.geojson").read_text())


def test_tiles_of_one_crs_each_use_their_own_transform(tmp_path, shapes):
    images, _ = shapes
    folder = tmp_path / "tiles"
    folder.mkdir()
    write_geotiff(folder / "a.tif", images[0], UTM_33N, NORTH_UP)
    write_geotiff(folder / "b.tif", images[1], UTM_33N, Affine.translation(1000, 0) @ NORTH_UP)
    code, output = predict(str(folder), "--out", str(tmp_path / "tiles.geojson"))
    assert code == 0, output
    collection = json.loads((tmp_path / "tiles.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    for feature in collection["features"]:
        west = shapely.geometry.shape(feature["geometry"]).bounds[0]
        start = 500_000 if feature["properties"]["file"] == "a.tif" else 501_000
        assert start <= west <= start + 128  # 256 pixels of 0.5 m


def test_resume_keeps_the_georeference_in_the_journal(tmp_path, shapes):
    images, _ = shapes
    folder = tmp_path / "incoming"
    folder.mkdir()
    write_geotiff(folder / "a.tif", images[0], UTM_33N, NORTH_UP)
    out = tmp_path / "resumed.geojson"
    assert predict(str(folder), "--out", str(out), "--resume")[0] == 0
    write_geotiff(folder / "b.tif", images[1], UTM_33N, Affine.translation(1000, 0) @ NORTH_UP)
    assert predict(str(folder), "--out", str(out), "--resume")[0] == 0  # only b.tif is predicted
    assert predict(str(folder), "--out", str(tmp_path / "whole.geojson"))[0] == 0
    assert out.read_bytes() == (tmp_path / "whole.geojson").read_bytes()
    assert "crs" in json.loads(out.read_text())


def test_without_rasterio_a_geotiff_is_reported_once_and_stays_in_pixels(tmp_path, shapes, monkeypatch):
    images, _ = shapes
    folder = tmp_path / "geo"
    folder.mkdir()
    write_geotiff(folder / "a.tif", images[0], UTM_33N, NORTH_UP)
    write_geotiff(folder / "b.tif", images[1], UTM_33N, NORTH_UP)
    monkeypatch.setitem(sys.modules, "rasterio", None)  # `import rasterio` raises ImportError
    code, output = predict(str(folder), "--out", str(tmp_path / "geo.geojson"))
    assert code == 0
    assert output.count("needs rasterio (pip install 'segcli[geo]'); GeoJSON coordinates stay pixels") == 1
    assert "crs" not in json.loads((tmp_path / "geo.geojson").read_text())


def test_a_plain_tiff_is_not_georeferenced_and_says_nothing(tmp_path, monkeypatch):
    tiff = require(SHARED_DATA / "tiff16" / "img2d.tif")  # microscopy, no GeoTIFF tags
    code, output = predict(str(tiff), "--out", str(tmp_path / "cells.geojson"), "--score-thr", "0.99")
    assert code == 0 and "warning" not in output
    assert "crs" not in json.loads((tmp_path / "cells.geojson").read_text())
    monkeypatch.setitem(sys.modules, "rasterio", None)
    code, output = predict(str(tiff), "--out", str(tmp_path / "cells2.geojson"), "--score-thr", "0.99")
    assert code == 0 and "warning" not in output


def test_other_formats_ignore_the_georeference(tmp_path, shapes):
    images, _ = shapes
    tif = write_geotiff(tmp_path / "scene.tif", images[0], UTM_33N, NORTH_UP)
    code, output = predict(str(tif), "--out", str(tmp_path / "scene.jsonl"))
    assert code == 0
    record = json.loads((tmp_path / "scene.jsonl").read_text())
    assert "geo" not in record and record["width"] == 256
