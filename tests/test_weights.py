"""Weights: registry, download (against a local HTTP server), checksum, cache, and safe loading.

Everything runs offline: downloads come from an http.server on 127.0.0.1, and every test's cache
lives under tmp_path through SEGCLI_HOME.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from segcli import weights
from segcli.categories import COCO_LABELS, coco_categories, coco_label_to_category_id
from segcli.errors import ExitCode, UsageError, WeightsError
from segcli.weights import (
    KNOWN_ARCHS,
    cache_dir,
    download,
    infer_arch,
    load_registry,
    lookup_registry,
    resolve_weights,
    save_checkpoint,
)
from tests.conftest import free_port

CLS_KEY = "roi_heads.box_predictor.cls_score.weight"
TINY_CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]


def tiny_state_dict(num_classes: int = 3) -> dict[str, torch.Tensor]:
    return {
        "roi_heads.box_head.fc6.weight": torch.zeros(4, 8),
        CLS_KEY: torch.arange(num_classes * 4, dtype=torch.float32).view(num_classes, 4),
    }


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def assert_one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Never touch the real cache, and never route 127.0.0.1 through a proxy."""
    monkeypatch.setenv("SEGCLI_HOME", str(tmp_path / "segcli-home"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "segcli-home" / "weights"


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, tiny_state_dict(), "maskrcnn_resnet50_fpn", TINY_CATEGORIES, [0, 1, 7],
                    {"trained_on": "test"})
    return path.read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /files/<name> serves a file; /short/<name> promises more bytes than it sends, then closes."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        kind, _, name = self.path.lstrip("/").partition("/")
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (1000 if kind == "short" else 0)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if kind == "short" else body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.hits = {}, []
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def stop() -> None:
        srv.shutdown()
        srv.server_close()

    srv.stop = stop
    yield srv
    stop()


# --- download, checksum, cache ---------------------------------------------------------------


def test_download_verifies_full_digest_and_prefix(server, tiny_bytes, isolated_cache):
    server.files["tiny.pth"] = tiny_bytes
    digest = hashlib.sha256(tiny_bytes).hexdigest()
    full = download(f"{server.base}/files/tiny.pth", digest, isolated_cache / "a.pth", progress=False)
    prefix = download(f"{server.base}/files/tiny.pth", digest[:8].upper(), isolated_cache / "b.pth", progress=False)
    assert full.read_bytes() == tiny_bytes == prefix.read_bytes()
    assert files_in(isolated_cache) == ["a.pth", "b.pth"]  # no temporary files left behind


def test_url_download_is_cached_and_reused_without_network(server, tiny_bytes, isolated_cache):
    name = f"tiny-{hashlib.sha256(tiny_bytes).hexdigest()[:8]}.pth"
    server.files[name] = tiny_bytes
    url = f"{server.base}/files/{name}"
    first = resolve_weights(url, progress=False)
    assert files_in(isolated_cache) == [name] and len(server.hits) == 1
    assert first.arch == "maskrcnn_resnet50_fpn" and first.source == url
    assert first.categories == TINY_CATEGORIES and first.label_to_category_id == [0, 1, 7]
    assert first.meta["trained_on"] == "test"
    server.stop()
    again = resolve_weights(url, progress=False)
    assert torch.equal(again.state_dict[CLS_KEY], tiny_state_dict()[CLS_KEY])
    assert len(server.hits) == 1


def test_corrupted_cached_file_is_downloaded_again(server, tiny_bytes, isolated_cache):
    name = f"tiny-{hashlib.sha256(tiny_bytes).hexdigest()[:8]}.pth"
    server.files[name] = tiny_bytes
    isolated_cache.mkdir(parents=True)
    (isolated_cache / name).write_bytes(b"bit rot")
    resolve_weights(f"{server.base}/files/{name}", progress=False)
    assert (isolated_cache / name).read_bytes() == tiny_bytes and len(server.hits) == 1


def test_wrong_checksum_is_an_error_and_leaves_nothing(server, tiny_bytes, isolated_cache):
    server.files["tiny.pth"] = tiny_bytes
    with pytest.raises(WeightsError) as excinfo:
        download(f"{server.base}/files/tiny.pth", "deadbeef", isolated_cache / "tiny.pth", progress=False)
    message = assert_one_line(excinfo)
    assert "deadbeef" in message and hashlib.sha256(tiny_bytes).hexdigest() in message and "discarded" in message
    assert files_in(isolated_cache) == []
    assert excinfo.value.exit_code == ExitCode.MODEL


def test_wrong_checksum_in_url_file_name(server, tiny_bytes, isolated_cache):
    server.files["tiny-deadbeef.pth"] = tiny_bytes
    with pytest.raises(WeightsError, match="checksum mismatch"):
        resolve_weights(f"{server.base}/files/tiny-deadbeef.pth", progress=False)
    assert files_in(isolated_cache) == []


def test_connection_closed_early_is_an_error_and_leaves_nothing(server, tiny_bytes, isolated_cache):
    server.files["tiny.pth"] = tiny_bytes
    with pytest.raises(WeightsError) as excinfo:
        download(f"{server.base}/short/tiny.pth", None, isolated_cache / "tiny.pth", progress=False)
    assert "could not download" in assert_one_line(excinfo)
    assert files_in(isolated_cache) == []


def test_http_error_is_an_error(server, isolated_cache):
    with pytest.raises(WeightsError, match="404"):
        download(f"{server.base}/files/missing.pth", None, isolated_cache / "missing.pth", progress=False)
    assert files_in(isolated_cache) == []


def test_unreachable_url_says_how_to_pass_a_local_file(isolated_cache):
    url = f"http://127.0.0.1:{free_port()}/model-0123abcd.pth"
    with pytest.raises(WeightsError) as excinfo:
        resolve_weights(url, progress=False)
    message = assert_one_line(excinfo)
    assert message.startswith(f"could not download {url}") and "--weights" in message
    assert files_in(isolated_cache) == []


def test_progress_bar_never_writes_to_stdout(server, tiny_bytes, isolated_cache, capsys, monkeypatch):
    server.files["tiny.pth"] = tiny_bytes
    url = f"{server.base}/files/tiny.pth"
    download(url, None, isolated_cache / "a.pth", progress=True)  # stderr is no terminal here: no bar
    assert capsys.readouterr() == ("", "")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # pretend it is one: the bar goes to stderr
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    download(url, None, isolated_cache / "b.pth", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "tiny.pth" in err


# --- cache location and registry -------------------------------------------------------------


def test_cache_dir_honours_segcli_home_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCLI_HOME", str(tmp_path / "s"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "s" / "weights"
    monkeypatch.delenv("SEGCLI_HOME")
    assert cache_dir() == tmp_path / "x" / "segcli" / "weights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h" / ".cache" / "segcli" / "weights"


def test_registry_has_the_torchvision_checkpoints():
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, MaskRCNN_ResNet50_FPN_Weights

    registry = load_registry()
    for name, tv_weights in [("maskrcnn_resnet50_fpn_coco", MaskRCNN_ResNet50_FPN_Weights.COCO_V1),
                             ("maskrcnn_resnet50_fpn_v2_coco", MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1)]:
        entry = registry[name]
        assert entry["url"] == tv_weights.url
        assert entry["url"].endswith(f"-{entry['sha256']}.pth") and len(entry["sha256"]) == 8
        assert entry["arch"] in KNOWN_ARCHS and entry["categories"] == "coco" and entry["description"]


def test_registry_aliases_resolve_without_downloading(server):
    name, entry = lookup_registry("coco")
    assert name == "maskrcnn_resnet50_fpn_v2_coco" and entry["arch"] == "maskrcnn_resnet50_fpn_v2"
    assert lookup_registry("maskrcnn_resnet50_fpn_coco")[1]["arch"] == "maskrcnn_resnet50_fpn"
    assert lookup_registry("nope") is None and lookup_registry("aliases") is None
    assert server.hits == []


def test_registry_entry_downloads_once_and_carries_its_metadata(server, tiny_bytes, tmp_path, monkeypatch):
    plain = tmp_path / "plain.pth"
    torch.save(tiny_state_dict(91), plain)
    server.files["plain.pth"] = plain.read_bytes()
    registry = {
        "aliases": {"mine": "plain_coco"},
        "plain_coco": {"url": f"{server.base}/files/plain.pth",
                       "sha256": hashlib.sha256(plain.read_bytes()).hexdigest(),
                       "arch": "maskrcnn_resnet50_fpn_v2", "categories": "coco", "description": "test entry"},
    }
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    monkeypatch.setattr(weights, "REGISTRY_PATH", tmp_path / "registry.json")
    checkpoint = resolve_weights("mine", progress=False)
    assert checkpoint.arch == "maskrcnn_resnet50_fpn_v2"  # from the entry, not inferred from fc6
    assert checkpoint.categories == coco_categories() and checkpoint.label_to_category_id == list(range(91))
    assert checkpoint.meta["registry_name"] == "plain_coco" and checkpoint.meta["description"] == "test entry"
    resolve_weights("plain_coco", progress=False)
    assert len(server.hits) == 1


def test_unknown_spec_lists_the_registry_names(tmp_path):
    with pytest.raises(WeightsError) as excinfo:
        resolve_weights(str(tmp_path / "no-such-file.pth"))
    message = assert_one_line(excinfo)
    assert "maskrcnn_resnet50_fpn_v2_coco" in message and "coco" in message


def test_local_file_loads_even_without_the_registry(tmp_path, monkeypatch):
    path = tmp_path / "plain.pth"
    torch.save(tiny_state_dict(), path)
    monkeypatch.setattr(weights, "REGISTRY_PATH", tmp_path / "missing.json")
    assert resolve_weights(str(path)).arch == "maskrcnn_resnet50_fpn"
    with pytest.raises(WeightsError, match="registry .* is missing"):
        load_registry()


# --- loading: layouts and safety -------------------------------------------------------------


def _mark(path: str) -> None:
    Path(path).write_text("code ran")


class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_mark, (self.marker,))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_state_dict(), "payload": RunsCode(str(marker))}, path)
    with pytest.raises(WeightsError) as excinfo:
        resolve_weights(str(path))
    message = assert_one_line(excinfo)
    assert "refused" in message and "could run code" in message and str(path) in message
    assert not marker.exists()


def test_not_a_checkpoint_names_the_file(tmp_path):
    torch.save(tiny_state_dict(), tmp_path / "good.pth")
    truncated = (tmp_path / "good.pth").read_bytes()[:200]
    cases = [("junk.pth", b"not a checkpoint"), ("xx.pth", b"xx"), ("empty.pth", b""), ("cut.pth", truncated)]
    for name, content in cases:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(WeightsError) as excinfo:
            resolve_weights(str(path))
        message = assert_one_line(excinfo)
        assert str(path) in message and "refused" not in message
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="not a Mask R-CNN checkpoint"):
        resolve_weights(str(path))


def test_plain_state_dict_with_explicit_arch(tmp_path):
    path = tmp_path / "plain.pth"
    sd = {CLS_KEY: torch.zeros(3, 4)}
    torch.save(sd, path)
    checkpoint = resolve_weights(str(path), arch="maskrcnn_resnet50_fpn_v2")
    assert checkpoint.arch == "maskrcnn_resnet50_fpn_v2" and checkpoint.meta["layout"] == "state_dict"
    assert checkpoint.categories == [{"id": 1, "name": "class_1"}, {"id": 2, "name": "class_2"}]
    assert checkpoint.label_to_category_id == [0, 1, 2]
    with pytest.raises(WeightsError, match="--arch"):
        resolve_weights(str(path))  # no arch given and no key signature to infer it from
    with pytest.raises(UsageError, match="--arch"):
        resolve_weights(str(path), arch="resnet9000")


def test_torchvision_reference_layout(tmp_path):
    path = tmp_path / "model_25.pth"
    torch.save({"model": tiny_state_dict(91), "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "params": [0]}]},
                "args": argparse.Namespace(lr=0.02, epochs=26), "epoch": 25}, path)
    checkpoint = resolve_weights(str(path))
    assert checkpoint.arch == "maskrcnn_resnet50_fpn" and checkpoint.meta["layout"] == "torchvision-reference"
    assert checkpoint.categories == coco_categories() and checkpoint.label_to_category_id == list(range(91))


def test_segcli_checkpoint_round_trip_ignores_extra_keys(tmp_path):
    path = tmp_path / "out" / "ckpt.pth"
    save_checkpoint(path, tiny_state_dict(), "maskrcnn_resnet18_fpn_small", TINY_CATEGORIES, [0, 1, 7],
                    {"dataset": "pets"}, extra={"optimizer": {"state": {}}, "epoch": 3})
    assert files_in(path.parent) == ["ckpt.pth"]
    checkpoint = resolve_weights(str(path))
    assert checkpoint.arch == "maskrcnn_resnet18_fpn_small" and checkpoint.meta["dataset"] == "pets"
    assert set(checkpoint.state_dict) == set(tiny_state_dict())
    with pytest.raises(WeightsError, match="drop --arch"):
        resolve_weights(str(path), arch="maskrcnn_resnet50_fpn")
    with pytest.raises(ValueError):
        save_checkpoint(path, {}, "maskrcnn_resnet50_fpn", [], [0], {}, extra={"model": {}})
    future = tmp_path / "future.pth"
    torch.save({"format": "segcli-checkpoint", "version": 1, "arch": "maskrcnn_vit_huge", "categories": [],
                "label_to_category_id": [0], "meta": {}, "model": tiny_state_dict()}, future)
    with pytest.raises(WeightsError, match="maskrcnn_vit_huge"):
        resolve_weights(str(future))


# --- architecture inference and categories ---------------------------------------------------


@pytest.fixture(scope="module")
def real_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.set_num_threads(1)
    small = MaskRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None), num_classes=5)
    return {
        "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(),
        "maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(),
        "maskrcnn_resnet18_fpn_small": small.state_dict(),
    }


def test_infer_arch_on_real_torchvision_models(real_state_dicts):
    for arch, state_dict in real_state_dicts.items():
        assert infer_arch(state_dict) == arch
    assert real_state_dicts["maskrcnn_resnet50_fpn"][CLS_KEY].shape[0] == 91


def test_coco_table_matches_torchvision():
    from torchvision.models._meta import _COCO_CATEGORIES

    assert COCO_LABELS == _COCO_CATEGORIES and len(COCO_LABELS) == 91
    categories = coco_categories()
    assert len(categories) == 80 and categories[0] == {"id": 1, "name": "person"}
    assert categories[-1] == {"id": 90, "name": "toothbrush"}
    assert all(COCO_LABELS[c["id"]] == c["name"] for c in categories)
    assert coco_label_to_category_id() == list(range(91))
