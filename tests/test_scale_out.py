"""`segcli predict --shard K/N` + `segcli merge`, and prediction under torchrun: the parts of a
split run, joined, are byte for byte the file one process writes over everything (real photos, a
real video kept whole, a name clash, a corrupt input), in every one-file format; per-image shards
share one folder; bad values and mismatched parts are refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from typer.testing import CliRunner

from segcli.cli import app
from segcli.data.video import VideoReader
from segcli.predict.merge import merge_parts
from segcli.predict.options import PredictOptions
from segcli.predict.run import run_predict
from segcli.predict.shards import ShardSpec, parse_shard, read_record, record_path, shard_range
from segcli.errors import UsageError
from tests.conftest import ROOT, SHARED_DATA, require
from tests.test_predict_cli import photos  # noqa: F401  (fixture)
from tests.test_resume import checkpoint, make_images  # noqa: F401  (fixture: the small model at 160 px)

VIDEO = SHARED_DATA / "videos" / "again.mkv"  # ~70 frames; every 20th is predicted
SUFFIXES = {"coco": ".json", "coco-results": ".json", "jsonl": ".jsonl", "geojson": ".geojson"}


@pytest.fixture(scope="module")
def sources(photos, tmp_path_factory) -> list[str]:  # noqa: F811
    """Seven inputs in three SOURCEs: a real video (first: the slowest input, which results that
    overtake it would show), two folders whose `x.jpg` clash (the second is renamed `b/x.jpg`) and a
    corrupt image; 3 shards cut them 2 + 2 + 3, the video whole in the first."""
    root = tmp_path_factory.mktemp("inputs")
    make_images(root / "a", photos, ["x.jpg", "y.jpg", "sub/z.jpg"])
    make_images(root / "b", photos[3:], ["x.jpg", "w.jpg"])
    (root / "b" / "broken.jpg").write_bytes(b"not an image at all")
    return [str(require(VIDEO)), str(root / "a"), str(root / "b")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every process here computes with one thread, as torchrun's ranks and 1-CPU Ray actors do:
    CPU float sums depend on the thread count, and so, in the last rounded digit, may the outputs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_run(sources, checkpoint, tmp_path_factory):  # noqa: F811
    """`one_run(fmt)`: the file one process writes over every input (made once per format)."""
    root, made = tmp_path_factory.mktemp("one_run"), {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            made[fmt] = root / f"one-{fmt}{SUFFIXES[fmt]}"
            summary = run_predict(options(sources, made[fmt], checkpoint, format=fmt))
            assert summary.images == 5 and summary.frames >= 3 and len(summary.failures) == 1
        return made[fmt]
    return get


def options(sources, out: Path, checkpoint: Path, **extra) -> PredictOptions:  # noqa: F811
    settings = dict(device="cpu", precision="fp32", score_thr=0.05, max_det=5, workers=0, progress=False,
                    quiet=True, vid_stride=20)
    return PredictOptions(sources=list(sources), out=str(out), weights=str(checkpoint), **(settings | extra))


def test_shards_are_contiguous_balanced_and_cover_every_input():
    for total in range(0, 23):
        for count in range(1, 8):
            ranges = [shard_range(ShardSpec(k, count), total) for k in range(1, count + 1)]
            assert [i for r in ranges for i in r] == list(range(total))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    assert parse_shard(" 2 / 8 ") == ShardSpec(2, 8)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_json_stream_reads_every_value_wherever_the_buffer_cuts_it(chunk, monkeypatch):
    """merge reads parts item by item; a value (a number such as 2.5 or -3e-7 too) may be cut by
    the end of any read."""
    import io

    import segcli.data.json_stream as json_stream

    monkeypatch.setattr(json_stream, "_CHUNK", chunk)
    document = {"info": {}, "images": [{"id": 1, "file_name": "é],\"}.jpg"}, {"id": 22, "n": 123456789}],
                "numbers": [1, 2.5, -3e-7, None, True, "s"], "z": 10.25}
    for text in (json.dumps(document), json.dumps(document, indent=2)):
        stream, found, raws = json_stream.JsonStream(io.StringIO(text)), {}, []
        for key in stream.members():
            if key in ("images", "numbers"):
                items = list(stream.items())
                found[key], raws = [value for value, _ in items], raws + [raw for _, raw in items]
            else:
                found[key] = stream.value()[0]
        stream.end()
        assert found == document
        assert [json.loads(raw) for raw in raws] == document["images"] + document["numbers"]
    with pytest.raises(json_stream.JsonStreamError, match="expected ',' or ']'"):
        list(json_stream.JsonStream(io.StringIO("[1 2]")).items())


@pytest.mark.parametrize("fmt", list(SUFFIXES))
def test_three_shards_merged_equal_one_run_byte_for_byte(fmt, sources, checkpoint, one_run, tmp_path):  # noqa: F811
    suffix, one = SUFFIXES[fmt], one_run(fmt)
    frames = len(list(VideoReader(VIDEO, 20)))
    parts, summaries = [], []
    for k in (1, 2, 3):
        parts.append(tmp_path / f"part-{k}{suffix}")
        summaries.append(run_predict(options(sources, parts[-1], checkpoint, format=fmt, shard=f"{k}/3")))
    # Balanced by input, the video whole in the first shard; the clash and the failure as in one run.
    assert [(s.images, s.frames, len(s.failures)) for s in summaries] == [
        (1, frames, 0), (2, 0, 0), (2, 0, 1)]
    merged = tmp_path / f"merged{suffix}"
    # Given in any order (a shell glob sorts part-10 before part-2): the records put them in place.
    summary = merge_parts([parts[2], parts[0], parts[1]], merged)
    assert (summary.parts, summary.inputs, summary.records) == (3, 7, 5 + frames)
    assert merged.read_bytes() == one.read_bytes()
    if fmt == "coco":
        coco = COCO(str(merged))
        assert "b/x.jpg" in {image["file_name"] for image in coco.dataset["images"]}
        assert len(coco.getAnnIds()) == sum(1 for _ in coco.dataset["annotations"]) > 0
        part = COCO(str(parts[0]))  # a part alone is a plain COCO file of its own images
        assert [image["id"] for image in part.dataset["images"]] == list(range(1, 2 + frames))


def test_cli_shards_and_merge(sources, checkpoint, one_run, tmp_path):  # noqa: F811
    """As typed: `--shard K/N` and `segcli merge part-*`, record files included by the glob."""
    runner = CliRunner()
    common = cli_flags(sources, checkpoint)
    for k in (1, 2):
        result = runner.invoke(app, ["predict", *common, "--shard", f"{k}/2", "--out", str(tmp_path / f"part-{k}.json")])
        assert result.exit_code == (0 if k == 1 else 1), result.output  # broken.jpg is input 5: shard 2
    assert record_path(tmp_path / "part-1.json").is_file()
    given = sorted(str(p) for p in tmp_path.glob("part-*"))  # parts and their .shard records
    result = runner.invoke(app, ["merge", *given, "--out", str(tmp_path / "merged.json")])
    assert result.exit_code == 0, result.output
    assert "merged 2 parts (7 inputs" in result.stderr
    assert (tmp_path / "merged.json").read_bytes() == one_run("coco").read_bytes()


def test_ranks_inside_a_shard_merge_into_that_shards_part(sources, checkpoint, one_run, tmp_path):  # noqa: F811
    """What torchrun does inside `--shard 2/2`, without the processes: the ranks' slices of shard 2,
    merged, are shard 2's part (with its record); with shard 1 that gives one run's file."""
    ranks = [tmp_path / f"rank-{r}.json" for r in (1, 2)]
    for r, part in enumerate(ranks, 1):
        run_predict(options(sources, part, checkpoint, shard="2/2", rank=ShardSpec(r, 2)))
    second = tmp_path / "part-2.json"
    merge_parts(ranks, second, allow_partial=True, label="2/2")
    record = read_record(second)
    assert (record.shard, record.span.start, record.span.stop, record.span.total) == ("2/2", 3, 7, 7)
    assert [image["id"] for image in json.loads(second.read_text())["images"]][:2] == [1, 2]
    run_predict(options(sources, tmp_path / "part-1.json", checkpoint, shard="1/2"))
    merge_parts([tmp_path / "part-1.json", second], tmp_path / "merged.json")
    assert (tmp_path / "merged.json").read_bytes() == one_run("coco").read_bytes()


def cli_flags(sources, checkpoint) -> list[str]:  # noqa: F811
    return [*sources, "--weights", str(checkpoint), "--device", "cpu", "--precision", "fp32", "--score-thr", "0.05",
            "--max-det", "5", "--workers", "0", "--vid-stride", "20", "-q"]


def test_resume_per_shard_after_the_folder_grew(photos, checkpoint, tmp_path):  # noqa: F811
    folder = tmp_path / "photos"
    make_images(folder, photos, ["b.jpg", "d.jpg", "f.jpg", "h.jpg"])
    parts = [tmp_path / f"part-{k}.jsonl" for k in (1, 2)]
    for k, part in enumerate(parts, 1):
        run_predict(options([folder], part, checkpoint, shard=f"{k}/2", vid_stride=1))
    make_images(folder, photos[4:], ["a.jpg", "e.jpg"])  # new files move the cut between the shards
    redone = [run_predict(options([folder], part, checkpoint, shard=f"{k}/2", vid_stride=1, resume=True))
              for k, part in enumerate(parts, 1)]
    # 6 inputs: shard 1 = a, b, d (b, d reused), shard 2 = e, f, h (f, h reused).
    assert [(s.images, s.reused) for s in redone] == [(1, 2), (1, 2)]
    merge_parts(parts, tmp_path / "merged.jsonl")
    run_predict(options([folder], tmp_path / "one.jsonl", checkpoint, vid_stride=1))
    assert (tmp_path / "merged.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_interrupted_shard_has_no_record_and_resume_finishes_it(photos, checkpoint, tmp_path, monkeypatch):  # noqa: F811
    from segcli.predict.core import Predictor

    folder = tmp_path / "photos"
    make_images(folder, photos, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    parts = [tmp_path / f"part-{k}.json" for k in (1, 2)]
    run_predict(options([folder], parts[1], checkpoint, shard="2/2", vid_stride=1))
    assert record_path(parts[1]).is_file()
    predict, calls = Predictor.predict, []

    def stopped_at_the_second_image(self, batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return predict(self, batch)

    monkeypatch.setattr(Predictor, "predict", stopped_at_the_second_image)
    with pytest.raises(KeyboardInterrupt):  # a rerun of shard 2, stopped halfway (Ctrl-C, SIGTERM)
        run_predict(options([folder], parts[1], checkpoint, shard="2/2", vid_stride=1))
    monkeypatch.undo()
    assert len(json.loads(parts[1].read_text())["images"]) == 1  # a valid file of what was done
    run_predict(options([folder], parts[0], checkpoint, shard="1/2", vid_stride=1))
    with pytest.raises(UsageError, match="has no part record"):
        merge_parts(parts, tmp_path / "merged.json")
    finished = run_predict(options([folder], parts[1], checkpoint, shard="2/2", vid_stride=1, resume=True))
    assert (finished.images, finished.reused) == (1, 1)
    merge_parts(parts, tmp_path / "merged.json")
    run_predict(options([folder], tmp_path / "one.json", checkpoint, vid_stride=1))
    assert (tmp_path / "merged.json").read_bytes() == (tmp_path / "one.json").read_bytes()


def test_per_image_shards_write_side_by_side_into_one_folder(photos, checkpoint, tmp_path):  # noqa: F811
    """Two shards at once into one labelme folder, each with its own journal and lock; `k.png`
    shares its stem with `k.jpg` in the other shard and still gets the name one run gives it."""
    folder = tmp_path / "photos"
    make_images(folder, photos, ["j.jpg", "k.jpg", "k.png", "m.jpg"])
    shared = tmp_path / "shards"
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda k: run_predict(options([folder], shared, checkpoint, format="labelme", vid_stride=1,
                                                    shard=f"{k}/2")), (1, 2)))
    single = tmp_path / "single"
    run_predict(options([folder], single, checkpoint, format="labelme", vid_stride=1))

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.json")
                if not any(part.startswith(".") for part in p.relative_to(root).parts)}

    assert sorted(files(single)) == ["j.json", "k.json", "k.png.json", "m.json"]
    assert files(shared) == files(single)
    assert {p.name for p in shared.glob(".segcli*")} == {".segcli-shard-1-of-2", ".segcli-shard-2-of-2"}


@pytest.mark.parametrize("value", ["0/3", "4/3", "3", "a/b", "1/0", "-1/3", "2/3/4", ""])
def test_bad_shard_values_exit_2_with_one_line(value, sources, tmp_path):
    result = CliRunner().invoke(app, ["predict", *sources, "--shard", value, "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    # An empty value is refused before the command runs, as for every option ("--shard is empty").
    assert len(lines) == 1 and lines[0].startswith(f"segcli: error: --shard {value!r}" if value else
                                                   "segcli: error: --shard is empty"), lines
    assert not (tmp_path / "p.json").exists()


@pytest.fixture(scope="module")
def parts(sources, checkpoint, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """coco parts: shards 1/2 and 2/2, 2/2 again with another threshold, with another model, and copied."""
    import torch

    root = tmp_path_factory.mktemp("parts")
    other_model = root / "other.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["roi_heads.box_predictor.cls_score.bias"] += 0.5
    torch.save(state, other_model)
    made = {"1": (1, checkpoint, {}), "2": (2, checkpoint, {}), "2-thr": (2, checkpoint, {"score_thr": 0.3}),
            "2-model": (2, other_model, {})}
    paths = {}
    for name, (k, weights, extra) in made.items():
        paths[name] = root / f"part-{name}.json"
        run_predict(options(sources[1:], paths[name], weights, shard=f"{k}/2", **extra))
    paths["2-copy"] = root / "copy-of-2.json"  # the same shard under another name
    for source, target in ((paths["2"], paths["2-copy"]), (record_path(paths["2"]), record_path(paths["2-copy"]))):
        target.write_bytes(source.read_bytes())
    return paths


@pytest.mark.parametrize("names, message", [
    (["1", "2-thr"], "parts made with different models or settings: '{1}' and '{2-thr}' differ in score_thr 0.05 vs 0.3"),
    (["1", "2-model"], "differ in weights 'sha256:"),
    (["1"], "inputs 4-6 of 6 are in no part given (the parts given are shards 1/2)"),
    (["1", "2", "2-copy"], "hold the same inputs (shard 2/2 and shard 2/2)"),
])
def test_merge_refuses_parts_that_do_not_fit(names, message, parts, tmp_path):
    for name, path in parts.items():
        message = message.replace("{" + name + "}", str(path))
    with pytest.raises(UsageError) as error:
        merge_parts([parts[name] for name in names], tmp_path / "merged.json")
    assert message in str(error.value)
    assert not (tmp_path / "merged.json").exists()


def test_merge_refuses_changed_unfinished_and_per_image_parts(parts, tmp_path):
    changed = tmp_path / "changed.json"
    changed.write_bytes(parts["2"].read_bytes().replace(b'"score":', b'"score": '))
    record_path(changed).write_bytes(record_path(parts["2"]).read_bytes())
    unfinished = tmp_path / "unfinished.json"
    unfinished.write_bytes(parts["2"].read_bytes())  # as if killed: the record is written last
    folder = tmp_path / "labels"
    folder.mkdir()
    runner = CliRunner()
    for given, words in [(changed, "changed after its shard run wrote it"), (unfinished, "has no part record"),
                         (folder, "per-image formats (labelme, yolo, png) need no merge"),
                         (tmp_path / "nope.json", "does not exist")]:
        result = runner.invoke(app, ["merge", str(parts["1"]), str(given), "--out", str(tmp_path / "m.json")])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("segcli: error: ") and words in lines[0], lines
    assert not (tmp_path / "m.json").exists()


def test_torchrun_two_cpu_processes_write_what_one_process_writes(sources, checkpoint, one_run, tmp_path):  # noqa: F811
    common = cli_flags(sources, checkpoint)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp.json"
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "segcli", "predict", *common[:-1], "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode != 0  # torchrun reports rank 0's exit code 1 (one input failed) as a failure
    assert ddp.stdout == ""
    # Rank 0 alone sums up, for both ranks: one summary line, listing the input that failed on rank 1
    # (which named it itself, as one process does, also when quiet).
    lines = ddp.stderr.splitlines()
    summaries = [line for line in lines if line.startswith("segcli: ")]
    assert len(summaries) == 1 and summaries[0].startswith("segcli: 5 images"), ddp.stderr[-3000:]
    assert summaries[0].endswith("1 input failed:")
    assert [line for line in lines if "broken.jpg: not an image" in line] == [
        f"warning: skipped {sources[2]}/broken.jpg: not an image (cannot identify format)",
        f"  {sources[2]}/broken.jpg: not an image (cannot identify format)"]
    assert out.read_bytes() == one_run("coco").read_bytes(), ddp.stderr[-3000:]
    ranks = out.parent / f".{out.name}.ranks"
    # The rank parts are gone; their journals stay for --resume.
    assert sorted(p.name for p in ranks.iterdir()) == [".part-1-of-2.json.segcli", ".part-2-of-2.json.segcli"]


def test_torchrun_rank_without_a_gpu_of_its_own_is_one_line(sources, checkpoint, tmp_path, monkeypatch):  # noqa: F811
    """On a 1-GPU machine, --nproc-per-node 2 leaves LOCAL_RANK 1 without a GPU: said before any work."""
    import torch

    import segcli.predict.torchrun as torchrun_predict

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torchrun_predict, "resolve_device", lambda spec: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match=r"rank 1 on a machine with 1 GPU\(s\).*--nproc-per-node at most that"):
        run_predict(options(sources, tmp_path / "p.json", checkpoint, device="auto"))
    assert not torch.distributed.is_initialized()
