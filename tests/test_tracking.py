"""`--track`: the matcher against brute force; the tracker's rules on hand-made detections; on a
synthetic video with the demo model against the true identity of every shape; on real footage
(../shared/data/videos) with detections from background subtraction; formats, resume and errors."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from segcli.cli import app
from segcli.predict import core as engine
from segcli.predict.options import PredictOptions
from segcli.predict.run import run_predict
from segcli.predict.tracking import Tracker, TrackSettings
from segcli.errors import UsageError
from segcli.ops.assignment import match, min_cost_assignment
from segcli.ops.rle_crops import rle_to_crop
from segcli.writers.coco import CocoWriter
from segcli.writers.geojson import GeoJsonWriter
from segcli.writers.overlay import draw, instance_colour
from segcli.writers.per_image import LabelMeWriter, PngWriter, Target
from tests.conftest import ROOT, SHARED_DATA, require, synthetic_shapes
from tests.motion_detector import MotionDetector

INTEL = SHARED_DATA / "videos" / "intel_one-by-one-person-detection.mp4"
FRAMES = 24  # of the synthetic video


# -- the matcher ---------------------------------------------------------------------------------

def brute_force_gain(similarity: np.ndarray, threshold: float) -> float:
    """The best total of (similarity - threshold) over one-to-one pairs above the threshold."""
    rows, cols = similarity.shape
    best = 0.0
    for size in range(min(rows, cols) + 1):
        for chosen_rows in itertools.combinations(range(rows), size):
            for chosen_cols in itertools.permutations(range(cols), size):
                pairs = list(zip(chosen_rows, chosen_cols))
                if all(similarity[r, c] > threshold for r, c in pairs):
                    best = max(best, sum(similarity[r, c] - threshold for r, c in pairs))
    return best


def test_match_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        rows, cols = (int(v) for v in rng.integers(0, 6, 2))
        similarity = rng.random((rows, cols)) * (rng.random((rows, cols)) < 0.7)  # sparse, as in tracking
        threshold = float(rng.choice([0.0, 0.2, 0.5]))
        pairs = match(similarity, threshold)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
        assert all(similarity[r, c] > threshold for r, c in pairs)
        gain = sum(similarity[r, c] - threshold for r, c in pairs)
        assert gain == pytest.approx(brute_force_gain(similarity, threshold), abs=1e-9)


def test_min_cost_assignment_is_optimal_against_every_permutation():
    rng = np.random.default_rng(1)
    for _ in range(100):
        rows = int(rng.integers(1, 6))
        cols = int(rng.integers(rows, 7))
        cost = rng.normal(size=(rows, cols))
        pairs = min_cost_assignment(cost)
        assert sorted(r for r, _ in pairs) == list(range(rows)) and len({c for _, c in pairs}) == rows
        best = min(sum(cost[r, p[r]] for r in range(rows)) for p in itertools.permutations(range(cols), rows))
        assert sum(cost[r, c] for r, c in pairs) == pytest.approx(best, abs=1e-9)


def test_match_prefers_one_strong_pair_over_two_weak_ones():
    # Maximizing the plain sum would take the two 0.5 pairs (1.0 > 0.9); ByteTrack's objective
    # (similarity - threshold: 0.6 > 0.2 + 0.2) keeps the confident match.
    similarity = np.array([[0.9, 0.5], [0.5, 0.0]])
    assert match(similarity, 0.3) == [(0, 0)]


# -- the tracker on hand-made detections ---------------------------------------------------------

def square(x: float, y: float, side: int = 20, size: int = 200) -> tuple[np.ndarray, dict]:
    mask = np.zeros((size, size), np.uint8)
    mask[int(y):int(y) + side, int(x):int(x) + side] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return np.array([x, y, x + side, y + side], float), {"size": [size, size], "counts": rle["counts"].decode()}


def step(tracker: Tracker, frame: int, objects: list[tuple[float, float, float, int]]) -> list[int]:
    """Detections (x, y, score, category) -> their track ids."""
    boxes, rles = zip(*(square(x, y) for x, y, _, _ in objects)) if objects else ((), ())
    ids = tracker.update(frame, np.array(boxes).reshape(-1, 4), np.array([o[2] for o in objects], np.float32),
                         np.array([o[3] for o in objects]), list(rles))
    return ids.tolist()


def test_two_objects_crossing_keep_their_ids_by_their_velocity():
    tracker = Tracker(TrackSettings(), score_thr=0.5)
    seen = []
    for frame in range(20):  # A moves right, B left, on one row; they pass each other at frame 10
        a, b = (20 + 8 * frame, 90, 0.9, 1), (181 - 8 * frame, 90, 0.8, 1)
        seen.append(step(tracker, frame, [a, b]))
    # Right after they pass, A is nearer where B was than where A was: only motion tells them apart.
    assert all(ids == [1, 2] for ids in seen), seen


def test_low_scores_keep_a_track_alive_but_never_start_one():
    tracker = Tracker(TrackSettings(low_thr=0.1), score_thr=0.5)
    ids = [step(tracker, f, [(10 + 3 * f, 50, 0.9 if f < 5 or f >= 9 else 0.3, 1)]) for f in range(12)]
    assert ids == [[1]] * 12  # frames 5-8 score 0.3: matched in the second stage, same track
    assert step(Tracker(TrackSettings(), 0.5), 0, [(10, 10, 0.3, 1)]) == [0]  # no track from a low score
    # With the second stage off (low_thr = score_thr), the object loses its track while it scores low,
    # and is found again by stage 1 while the lost track waits (buffer 30).
    tracker = Tracker(TrackSettings(low_thr=0.5), score_thr=0.5)
    ids = [step(tracker, f, [(10 + 3 * f, 50, 0.9 if f < 5 or f >= 9 else 0.3, 1)]) for f in range(12)]
    assert ids[4] == [1] and ids[5:9] == [[0]] * 4 and ids[9:] == [[1]] * 3


def test_a_lost_track_waits_buffer_frames_and_ids_are_never_reused():
    tracker = Tracker(TrackSettings(buffer=5), score_thr=0.5)
    assert step(tracker, 0, [(50, 50, 0.9, 1)]) == [1]
    assert all(step(tracker, f, []) == [] for f in range(1, 5))  # missed in frames 1-4
    assert step(tracker, 5, [(50, 50, 0.9, 1)]) == [1]  # unseen for 5 frames: found again
    assert all(step(tracker, f, []) == [] for f in range(6, 11))
    assert step(tracker, 11, [(50, 50, 0.9, 1)]) == [2]  # unseen for 6 > 5: a new object, a new id
    assert step(tracker, 12, [(50, 50, 0.9, 1), (120, 120, 0.9, 1)]) == [2, 3]
    assert step(tracker, 13, [(50, 50, 0.9, 3)]) == [4]  # another category at the same place: another object
    # --track-buffer 0: a track ends at its first missed frame, whatever the stride.
    tracker = Tracker(TrackSettings(buffer=0), score_thr=0.5)
    assert [step(tracker, f, [(50, 50, 0.9, 1)]) for f in (0, 5, 10)] == [[1]] * 3
    assert step(tracker, 15, []) == [] and step(tracker, 20, [(50, 50, 0.9, 1)]) == [2]


def test_mask_iou_moves_the_mask_by_whole_pixels():
    a, b = rle_to_crop(square(10, 10)[1]), rle_to_crop(square(15, 10)[1])
    assert a.iou(b) == pytest.approx(15 * 20 / (25 * 20))
    assert a.iou(b, dx=5) == 1.0 and a.iou(b, dx=40) == 0.0


# -- synthetic video, demo model -------------------------------------------------------------------

def moving_shapes():
    spec = importlib.util.spec_from_file_location("moving_shapes", ROOT / "examples" / "moving_shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def demo_options(source: Path, out: Path, **extra) -> PredictOptions:
    settings = dict(weights="shapes_demo", device="cpu", precision="fp32", workers=0, progress=False, quiet=True)
    return PredictOptions(sources=[str(source)], out=str(out), **(settings | extra))


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """One video of moving shapes plus a still image, predicted with and without --track."""
    folder = tmp_path_factory.mktemp("moving")
    truth = json.loads(moving_shapes().generate(folder / "clips" / "shapes.avi", frames=FRAMES).read_text())
    still, _ = synthetic_shapes().make_image(np.random.default_rng(5), 256)
    cv2.imwrite(str(folder / "clips" / "still.png"), still[..., ::-1])
    tracked, plain = folder / "tracked.jsonl", folder / "plain.jsonl"
    run_predict(demo_options(folder / "clips", tracked, track=TrackSettings(buffer=5), overlay=str(folder / "overlay")))
    run_predict(demo_options(folder / "clips", plain, vid_stride=2))  # every other frame is enough to compare
    records = [json.loads(line) for line in tracked.read_text().splitlines()]
    return truth, records, [json.loads(line) for line in plain.read_text().splitlines()], folder


def true_objects_to_ids(truth: dict, frames: list[dict]) -> dict[int, list[tuple[int, int]]]:
    """Each true object -> [(frame, track id of the detection of its class that covers it best)]."""
    found: dict[int, list[tuple[int, int]]] = {}
    for number, (objects, record) in enumerate(zip(truth["frames"], frames)):
        for obj in objects:
            same = [i for i in record["instances"] if i["category_id"] == obj["category_id"]]
            if not same:
                continue
            iou = mask_utils.iou([i["segmentation"] for i in same], [obj["segmentation"]], [0]).reshape(-1)
            if iou.max() > 0.5:
                found.setdefault(obj["object"], []).append((number, same[int(iou.argmax())]["track_id"]))
    return found


def test_each_shape_keeps_one_id_and_new_shapes_get_new_ones(shapes_run):
    truth, records, _, _ = shapes_run
    frames = [r for r in records if r["frame"] is not None]
    assert len(frames) == len(truth["frames"]) == FRAMES
    visible = {n: sum(any(o["object"] == n for o in objects) for objects in truth["frames"]) for n in range(1, 5)}
    found = true_objects_to_ids(truth, frames)
    ids = {}
    for number in range(1, 5):
        assert len(found[number]) >= 0.8 * visible[number], (number, found[number])  # the model does find them
        assert len({track for _, track in found[number]}) == 1, (number, found[number])  # one id the whole way
        ids[number] = found[number][0][1]
    assert len(set(ids.values())) == 4  # different objects, different ids
    # Shape 1 crossed the whole frame (from off its left edge to off its right edge) under one id.
    first = [f for f, _ in found[1]]
    boxes = {f: i["bbox"] for f in first for i in frames[f]["instances"] if i["track_id"] == ids[1]}
    assert boxes[max(first)][0] - boxes[min(first)][0] > 0.6 * truth["size"]
    # Shape 4 (same class as shape 1, appearing after it left) is a new object: a new, higher id.
    start4 = found[4][0][0]
    earlier = {i["track_id"] for r in frames[:start4] for i in r["instances"]}
    assert ids[4] not in earlier and ids[4] > max(earlier)


def test_ids_count_up_in_order_of_appearance_and_never_come_back(shapes_run):
    _, records, _, _ = shapes_run
    appearances: dict[int, list[int]] = {}
    for record in records:
        for instance in record["instances"]:
            if record["frame"] is not None:
                appearances.setdefault(instance["track_id"], []).append(record["frame"])
    firsts = [frames[0] for _, frames in sorted(appearances.items())]
    assert sorted(appearances) == list(range(1, len(appearances) + 1))
    assert firsts == sorted(firsts)
    for frames in appearances.values():  # a track unseen for more than --track-buffer (5) has ended
        assert all(b - a <= 6 for a, b in zip(frames, frames[1:])), frames


def test_track_adds_ids_and_changes_nothing_else(shapes_run):
    _, records, plain, _ = shapes_run
    assert len(records) == FRAMES + 1 and len(plain) == FRAMES // 2 + 1  # the frames and the still image
    plain_frames = {(r["file"], r["frame"]): r for r in plain}
    compared = 0
    for tracked in records:
        untracked = plain_frames.get((tracked["file"], tracked["frame"]))
        if untracked is None:
            continue
        if tracked["frame"] is None:
            assert tracked["instances"] and all("track_id" not in i for i in tracked["instances"])  # images: no ids
        else:
            assert all(i["track_id"] >= 1 for i in tracked["instances"])
        stripped = [{k: v for k, v in i.items() if k != "track_id"} for i in tracked["instances"]]
        assert {**tracked, "instances": stripped} == untracked
        compared += 1
    assert compared == len(plain)


def test_overlay_video_and_one_colour_per_track(shapes_run):
    _, records, _, folder = shapes_run
    capture = cv2.VideoCapture(str(folder / "overlay" / "shapes.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    # The same track drawn at different ranks gets the same colour: its own, not its rank's.
    record, alone = next((r, a) for r in records if r["frame"] is not None and len(r["instances"]) >= 2
                         for a in [undrawn_pixels(r)] if min(m.sum() for m in a) > 100)
    image = np.zeros((record["height"], record["width"], 3), np.uint8)
    for order in (record["instances"], record["instances"][::-1]):
        canvas = draw(image, {**record, "instances": order})
        for instance, pixels in zip(record["instances"], alone):
            expected = (np.array(instance_colour(instance["track_id"])) * 0.45).astype(np.uint8)
            assert np.abs(np.median(canvas[pixels], axis=0) - expected).max() <= 1


def undrawn_pixels(record: dict) -> list[np.ndarray]:
    """Per instance, the pixels of its mask that no other mask, box outline or label covers."""
    masks = [mask_utils.decode(i["segmentation"]).astype(bool) for i in record["instances"]]
    drawn_over = np.zeros(masks[0].shape, bool)
    for instance in record["instances"]:
        x, y, w, h = (int(round(v)) for v in instance["bbox"])
        drawn_over[max(y - 25, 0):y + 25, max(x - 4, 0):x + w + 4] = True  # label and top edge
        drawn_over[max(y - 4, 0):y + h + 4, max(x - 4, 0):x + 4] = True
        drawn_over[max(y - 4, 0):y + h + 4, max(x + w - 4, 0):x + w + 4] = True
        drawn_over[max(y + h - 4, 0):y + h + 4, max(x - 4, 0):x + w + 4] = True
    return [m & ~drawn_over & ~np.any([o for j, o in enumerate(masks) if j != k], axis=0) for k, m in enumerate(masks)]


def test_track_ids_survive_every_format_that_can_hold_them(shapes_run, tmp_path):
    _, records, _, _ = shapes_run
    frames = [r for r in records if r["frame"] is not None][:5]
    categories = [{"id": c, "name": n} for c, n in zip((1, 3, 5, 7, 9), ("circle", "square", "triangle", "ring", "star"))]
    with CocoWriter(tmp_path / "coco.json", categories) as writer:
        for record in frames:
            writer.add_record(record)
    coco = COCO(str(tmp_path / "coco.json"))  # pycocotools loads it
    expected = [i["track_id"] for r in frames for i in r["instances"]]
    annotations = [coco.anns[a] for a in sorted(coco.anns)]
    assert [a["track_id"] for a in annotations] == expected
    # CVAT (and Datumaro) import a COCO annotation as a track shape from attributes.track_id + keyframe.
    assert all(a["attributes"] == {"track_id": a["track_id"], "keyframe": True} for a in annotations)
    with CocoWriter(tmp_path / "results.json", categories, results_only=True) as writer:
        for record in frames:
            writer.add_record(record)
    assert [r["track_id"] for r in json.loads((tmp_path / "results.json").read_text())] == expected
    import io

    buffer = io.BytesIO()
    geojson = GeoJsonWriter(buffer)
    for record in frames:
        geojson.add_record({**record, "instances": [{**i, "polygons": []} for i in record["instances"]]})
    geojson.finish()
    assert [f["properties"]["track_id"] for f in json.loads(buffer.getvalue())["features"]] == expected
    png = PngWriter(tmp_path / "png", categories)
    record = max(frames, key=lambda r: len(r["instances"]))
    png.write(Target(record, "frame", Path("clip.avi")))
    values = cv2.imread(str(tmp_path / "png" / "frame.instances.png"), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(values)) - {0} == {i["track_id"] for i in record["instances"]}
    polygon = [[[0, 0], [10, 0], [10, 10], [0, 0]]]
    LabelMeWriter(tmp_path / "labelme").write(Target(
        {**record, "instances": [{**i, "polygons": [polygon]} for i in record["instances"]]}, "frame", Path("clip.avi")))
    shapes = json.loads((tmp_path / "labelme" / "frame.json").read_text())["shapes"]
    assert [s["group_id"] for s in shapes] == [i["track_id"] for i in record["instances"]]


# -- real footage, detections from background subtraction -----------------------------------------

# The intel clip: six people, one after another, walk in at the lower left, stop at the table and
# walk out on the right (frames seen in the footage; each person is fully in view in between).
VISITS = [(70, 190), (232, 440), (512, 690), (752, 860), (932, 1190), (1242, 1350)]
EMPTY = [(0, 50), (210, 222), (462, 500), (712, 740), (882, 920), (1212, 1232), (1372, 1393)]


@pytest.fixture
def motion(monkeypatch):
    """Predictor.load gives a MotionDetector for the clip (the model is replaced, nothing else)."""
    def use(video: Path, **kwargs) -> MotionDetector:
        detector = MotionDetector(require(video), **kwargs)
        monkeypatch.setattr(engine.Predictor, "load", classmethod(lambda cls, *args, **kw: detector))
        return detector
    return use


def test_people_walking_through_real_footage_keep_one_id_each(motion, tmp_path):
    motion(INTEL)
    out = tmp_path / "intel.json"
    run_predict(PredictOptions(sources=[str(INTEL)], out=str(out), workers=0, progress=False, quiet=True,
                               vid_stride=2, track=TrackSettings(), slice="off"))
    coco = COCO(str(out))
    by_frame = {image["frame"]: [coco.anns[a] for a in coco.getAnnIds(imgIds=image["id"])] for image in coco.imgs.values()}
    ids = []
    for first, last in VISITS:
        frames = [f for f in by_frame if first <= f <= last]
        assert all(len(by_frame[f]) == 1 for f in frames), [(f, len(by_frame[f])) for f in frames]
        tracks = {by_frame[f][0]["track_id"] for f in frames}
        assert len(tracks) == 1, (first, last, tracks)  # one person, one id, walking in, standing, walking out
        ids.append(tracks.pop())
        centres = [a["bbox"][0] + a["bbox"][2] / 2 for anns in by_frame.values() for a in anns if a["track_id"] == ids[-1]]
        assert max(centres) - min(centres) > 250, centres  # the id follows them across the frame
    assert ids == sorted(ids) and len(set(ids)) == 6  # each new person, a new id
    for first, last in EMPTY:
        assert not any(by_frame[f] for f in by_frame if first <= f <= last)
    # No id outside its person's visit: ids are never handed to someone else.
    for track, (first, last) in zip(ids, VISITS):
        frames = [f for f, anns in by_frame.items() for a in anns if a["track_id"] == track]
        assert first - 20 <= min(frames) and max(frames) <= last + 20
    assert {a["track_id"] for a in coco.anns.values()} == set(ids)


def test_resume_redoes_an_interrupted_video_whole_with_the_same_ids(motion, tmp_path):
    out = tmp_path / "intel.jsonl"

    def options(**extra) -> PredictOptions:
        settings = dict(workers=0, progress=False, quiet=True, vid_stride=10, track=TrackSettings(), slice="off")
        return PredictOptions(sources=[str(INTEL)], out=str(out), **(settings | extra))

    motion(INTEL)
    run_predict(options())
    whole = out.read_bytes()
    motion(INTEL, fail_at_frame=800)  # Ctrl-C in the middle of the video
    with pytest.raises(KeyboardInterrupt):
        run_predict(options())
    assert out.read_bytes() == b""  # the video was not finished: nothing of it is kept
    motion(INTEL)
    summary = run_predict(options(resume=True))
    assert summary.frames == 140 and out.read_bytes() == whole
    with pytest.raises(UsageError, match="track"):  # other track settings: a different output
        run_predict(options(resume=True, track=TrackSettings(buffer=10)))


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "args, words",
    [
        (["--track", "--track-buffer", "-1"], "--track-buffer"),
        (["--track", "--track-low-thr", "1.5"], "--track-low-thr"),
        (["--track", "--track-low-thr", "0.6", "--score-thr", "0.5"], "--track-low-thr 0.6 is above --score-thr"),
        (["--track", "--track-iou", "1"], "--track-iou"),
        (["--track-buffer", "5"], "--track-buffer needs --track"),
        (["--track-iou", "0.5"], "--track-iou needs --track"),
        (["--track", "--ray"], "--track runs in one process, not on Ray"),
    ],
)
def test_bad_track_values_are_one_line_and_exit_2(args, words, tmp_path):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    result = CliRunner().invoke(app, ["predict", str(image), "--out", str(tmp_path / "p.json"), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: ") and words in lines[0], result.output
    assert not (tmp_path / "p.json").exists()
