"""`segcli merge` under faults: parts truncated, reordered, duplicated, hand-edited (valid JSON,
wrong checksum), foreign (another model, another --score-thr), records damaged or edited, parts of
two runs mixed. Each is refused with one `segcli: error:` line, exit code 2, and nothing written;
the good ones merge to one process's bytes. A merge killed with SIGKILL at 20 seeded moments
leaves the output absent or complete, and a rerun gives one process's bytes and removes the
killed one's temporary file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.predict.options import PredictOptions
from segcli.predict.run import run_predict
from segcli.predict.shards import record_path
from tests.conftest import ROOT
from tests.test_predict_cli import photos  # noqa: F401  (fixture)
from tests.test_resume import checkpoint, make_images  # noqa: F401  (fixture: the small model at 160 px)

NAMES = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]


def options(folder: Path, out: Path, weights: Path, **extra) -> PredictOptions:
    settings = dict(device="cpu", precision="fp32", score_thr=0.05, max_det=8, workers=0, progress=False, quiet=True)
    return PredictOptions(sources=[str(folder)], out=str(out), weights=str(weights), **(settings | extra))


@pytest.fixture(scope="module")
def runs(photos, checkpoint, tmp_path_factory):  # noqa: F811
    """Parts of 3 shards (coco and jsonl), one process's files, and foreign parts: shard 2 with
    another model, with another --score-thr, and over another folder (another run)."""
    import torch

    root = tmp_path_factory.mktemp("merge_faults")
    folder, other_folder = root / "photos", root / "other"
    make_images(folder, photos, NAMES)
    make_images(other_folder, photos[1:], NAMES[:5])
    other_model = root / "other.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["roi_heads.box_predictor.cls_score.bias"] += 0.5
    torch.save(state, other_model)
    made = {}
    for suffix in (".json", ".jsonl"):
        made[f"one{suffix}"] = root / f"one{suffix}"
        run_predict(options(folder, made[f"one{suffix}"], checkpoint))
        for k in (1, 2, 3):
            made[f"part-{k}{suffix}"] = root / f"part-{k}{suffix}"
            run_predict(options(folder, made[f"part-{k}{suffix}"], checkpoint, shard=f"{k}/3"))
    for name, weights, extra, source in (("model", other_model, {}, folder),
                                         ("thr", checkpoint, {"score_thr": 0.3}, folder),
                                         ("run", checkpoint, {}, other_folder)):
        made[f"2-{name}"] = root / f"foreign-{name}" / "part-2.json"
        run_predict(options(source, made[f"2-{name}"], weights, shard="2/3", **extra))
    made["1of2"] = root / "halves" / "part-1.json"  # the same run cut in 2, not 3
    run_predict(options(folder, made["1of2"], checkpoint, shard="1/2"))
    assert json.loads(made["one.json"].read_text())["annotations"], "the model must detect something"
    return made


def merge(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["merge", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def copy_part(source: Path, target: Path, data: bytes | None = None, record: bytes | None = None) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes() if data is None else data)
    record_path(target).write_bytes(record_path(source).read_bytes() if record is None else record)
    return target


def assert_refused(code: int, stdout: str, stderr: str, out: Path, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2 and stdout == "", (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("segcli: error: "), lines
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary file left"


def _edited_parts(runs, tmp_path: Path):
    """(name, parts given, words of the error) for every damaged or foreign part."""
    p1, p2, p3 = (runs[f"part-{k}.json"] for k in (1, 2, 3))
    data = p2.read_bytes()
    record = json.loads(record_path(p2).read_text())
    cases = []
    rng = random.Random(22)
    for cut in sorted(rng.sample(range(1, len(data)), 6)) + [0]:  # truncated anywhere, or emptied
        cases.append((f"truncated at {cut}", [p1, copy_part(p2, tmp_path / f"cut{cut}" / "part-2.json", data[:cut]), p3],
                      "changed after its shard run wrote it"))
    coco = json.loads(data)
    coco["images"].reverse()  # reordered inside: valid JSON, another checksum
    cases.append(("images reordered", [p1, copy_part(p2, tmp_path / "reordered" / "p.json", json.dumps(coco).encode()), p3],
                  "changed after"))
    coco = json.loads(data)
    for annotation in coco["annotations"]:
        annotation["score"] = 1.0
    cases.append(("scores edited", [p1, copy_part(p2, tmp_path / "edited" / "p.json", json.dumps(coco).encode()), p3],
                  "changed after"))
    cases.append(("one byte flipped", [p1, copy_part(p2, tmp_path / "flip" / "p.json",
                                                     data[:40] + bytes([data[40] ^ 1]) + data[41:]), p3], "changed after"))
    # The record edited, so that it vouches for an edited part: the merge still checks the part itself.
    coco = json.loads(data)
    coco["images"] = coco["images"][:-1]
    body = json.dumps(coco).encode()
    import hashlib
    vouching = {**record, "part_bytes": len(body), "part_sha256": hashlib.sha256(body).hexdigest()}
    cases.append(("record vouches for an image less",
                  [p1, copy_part(p2, tmp_path / "vouch" / "p.json", body, json.dumps(vouching).encode()), p3],
                  "is not the file its record describes"))
    # Records damaged: truncated, not JSON, fields missing, of the wrong type or absurd.
    raw = record_path(p2).read_bytes()
    edits = {"record truncated": raw[: len(raw) // 2], "record empty": b"", "record not JSON": b"\x00\xffnot json",
             "record a list": b"[]", "record null": b"null"}
    for key in ("span", "records", "fingerprint", "format", "shard", "part_sha256"):  # (version has a default)
        edits[f"record without {key}"] = json.dumps({k: v for k, v in record.items() if k != key}).encode()
    for key, value in (("span", "1-2"), ("span", {"start": "a", "stop": 2, "total": 6, "digest": "x"}),
                       ("span", {"start": 2, "stop": 1, "total": 6, "digest": record["span"]["digest"]}),
                       ("span", {"start": -4, "stop": 99, "total": 6, "digest": record["span"]["digest"]}),
                       ("records", "two"), ("records", -1), ("records", 10**30), ("fingerprint", []),
                       ("fingerprint", None), ("format", ["coco"]), ("format", "labelme"), ("version", "1"),
                       ("part_bytes", "x"), ("extra", 1)):
        edits[f"record {key}={value!r}"] = json.dumps({**record, key: value}).encode()
    for name, body in edits.items():
        cases.append((name, [p1, copy_part(p2, tmp_path / f"rec{len(cases)}" / "part-2.json", record=body), p3], ""))
    # Foreign parts and mixed runs.
    cases += [("another model", [p1, runs["2-model"], p3], "differ in weights"),
              ("another --score-thr", [p1, runs["2-thr"], p3], "differ in score_thr 0.05 vs 0.3"),
              ("another run's part", [p1, runs["2-run"], p3], "parts made over different inputs"),
              ("halves and thirds mixed", [runs["1of2"], p3], "are in no part given"),
              ("thirds overlapping a half", [runs["1of2"], p2, p3], "hold the same inputs"),
              ("a shard copied", [p1, p2, copy_part(p2, tmp_path / "copy" / "again.json"), p3], "hold the same inputs"),
              ("a part missing", [p1, p3], "inputs 3-4 of 6 are in no part given"),
              ("coco and jsonl parts", [p1, runs["part-2.jsonl"], p3], "parts of different formats"),
              ("a record given alone", [p1, record_path(p2), p3], "is a part record")]
    return cases


def test_damaged_foreign_and_mixed_parts_are_one_line_exit_2_nothing_written(runs, tmp_path):
    out = tmp_path / "out" / "merged.json"
    out.parent.mkdir()
    cases = _edited_parts(runs, tmp_path / "cases")
    assert len(cases) >= 40
    wrong = []
    for name, parts, words in cases:
        try:
            code, stdout, stderr = merge(*parts, "--out", out)
            assert_refused(code, stdout, stderr, out, *([words] if words else []))
        except AssertionError as error:
            wrong.append(f"{name}: {error}")
        out.unlink(missing_ok=True)
    assert not wrong, "\n".join(wrong)
    # An existing output is left as it was by a refused merge.
    out.write_bytes(b"old")
    code, stdout, stderr = merge(runs["part-1.json"], runs["2-thr"], runs["part-3.json"], "--out", out)
    assert code == 2 and out.read_bytes() == b"old"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_parts_in_any_order_and_given_twice_merge_to_one_process(runs, tmp_path, suffix):
    parts = [runs[f"part-{k}{suffix}"] for k in (1, 2, 3)]
    for order in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
        out = tmp_path / f"m{''.join(map(str, order))}{suffix}"
        given = [parts[i] for i in order] + [parts[order[0]]] + [record_path(parts[1])]  # a path twice, a record
        code, _, stderr = merge(*given, "--out", out, "-q")
        assert code == 0 and stderr == "", stderr
        assert out.read_bytes() == runs[f"one{suffix}"].read_bytes()


_SLOW_MERGE = """
import sys, time
import segcli.predict.merge as merge
real = merge.atomic_write

class Slow:
    def __init__(self, handle):
        self.handle = handle
    def write(self, data):
        time.sleep(0.002)  # a merge of many parts takes time: give the kills room to land mid-write
        return self.handle.write(data)
    def __getattr__(self, name):
        return getattr(self.handle, name)

import contextlib
@contextlib.contextmanager
def slow(path, *args, **kwargs):
    with real(path, *args, **kwargs) as handle:
        yield Slow(handle)

merge.atomic_write = slow
print("ready", flush=True)
from segcli.cli import main
sys.argv = ["segcli", "merge", *sys.argv[1:]]
main()
"""


def test_merge_killed_at_20_seeded_moments_leaves_nothing_or_everything(runs, tmp_path):
    parts = [str(runs[f"part-{k}.json"]) for k in (3, 1, 2)]
    reference = runs["one.json"].read_bytes()
    out = tmp_path / "merged.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start() -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, *parts, "--out", str(out), "-q"], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout.readline() == b"ready\n"
        return process

    began = time.perf_counter()
    whole = start()
    assert whole.wait(timeout=120) == 0, whole.stderr.read()
    duration = time.perf_counter() - began
    assert out.read_bytes() == reference
    rng = random.Random(2022)
    outcomes = {"absent": 0, "complete": 0, "temporary left": 0}
    for point in range(20):
        out.unlink(missing_ok=True)
        process = start()
        time.sleep(rng.uniform(0, duration))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        if out.exists():  # finished before the kill, or killed after the rename
            assert out.read_bytes() == reference, point
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
        outcomes["temporary left"] += len([p for p in tmp_path.iterdir() if p.name.startswith(".merged.json.")])
        # Rerun: one process's bytes, whatever the kill left (a stale temporary file at most).
        code, _, stderr = merge(*parts, "--out", out, "-q")
        assert code == 0 and stderr == "" and out.read_bytes() == reference
        # A kill mid-write leaves its temporary file beside the output (never the output itself);
        # the next write into that output removes it, as its writer is gone.
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.json.")], point
    assert outcomes["absent"] >= 5 and outcomes["temporary left"] >= 1, outcomes  # kills landed mid-write too
    print(f"merge kills: {outcomes}")
