"""What `--track` and `--review` cost: frames/s and images/s of `segcli predict` with and without
them, in one process, on the same inputs, the variants interleaved round by round, with the ratio.

    python benchmarks/track_review_cost.py                       # every case, 3 rounds
    python benchmarks/track_review_cost.py --rounds 5 --frames 120 --cases video-seeded

Cases (the baseline first in each):
- `video, seeded model`: `--frames` frames of the OpenCV pedestrian clip (real footage, many people;
  ../shared/data/videos/arjun234_vtest.avi), segcli's small architecture with seeded weights scaled
  on the clip's frames to about 10 detections above 0.5 per frame (and more below it, as a trained
  model's spread of scores).
  The cost of --track is the tracker plus the mask work on the detections the model now finds
  between --track-low-thr (0.1) and --score-thr, which only the tracker sees.
- `video, demo model`: the moving-shapes video (examples/moving_shapes.py), shapes_demo.
- `images, demo model`: synthetic shapes; none, --review, --review --review-flip (a second pass).
- `photos, seeded model`: coco_tiny's real photos; none, --review (the model runs 0.25 lower; the
  candidates it then finds get no mask, so what they cost is the box stage's work on them).

Measured on the 2-core CPU (2 rounds, quiet): --track costs 1.00x with the demo model and 1.98x
with the seeded one (100 candidates a frame, each masked for the tracker's second stage);
--review 0.97x and 1.01x (1.96x before the candidates went without masks); --review-flip 2.08x.

Printed per variant: wall time and this process's CPU time per frame or image, each against the
first line (x > 1: costlier); `own`, the time inside the tracker or the review queue themselves
(VideoTracks.assign, ReviewQueue.add; the flip's forward pass is not in it, it is model time);
`found`, the detections the model returned (mirror images' included), and `written`, those above
--score-thr. On a shared machine wall times are noisy and CPU times less so: compare the ratios
of one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import real_photos, seeded_state_dict  # noqa: E402
from benchmarks.stream_memory import looped_video  # noqa: E402
from segcli.categories import coco_categories, coco_label_to_category_id  # noqa: E402
from segcli.predict import core as engine  # noqa: E402
from segcli.predict.options import PredictOptions  # noqa: E402
from segcli.predict.run import run_predict
from segcli.predict.review import ReviewQueue, ReviewSettings  # noqa: E402
from segcli.predict.tracking import TrackSettings, VideoTracks  # noqa: E402
from segcli.weights import save_checkpoint  # noqa: E402

PEDESTRIANS = ROOT.parent / "shared" / "data" / "videos" / "arjun234_vtest.avi"


class Stopwatch:
    """Total seconds spent in one method, however often it is called."""

    def __init__(self, owner: type, name: str) -> None:
        self.owner, self.name, self.seconds, self.calls = owner, name, 0.0, 0
        self.original = getattr(owner, name)
        watch = self

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return watch.original(*args, **kwargs)
            finally:
                watch.seconds += time.perf_counter() - started
                watch.calls += 1

        setattr(owner, name, timed)

    def take(self) -> tuple[float, int]:
        seconds, calls = self.seconds, self.calls
        self.seconds, self.calls = 0.0, 0
        return seconds, calls


class DetectionCounter:
    """Counts the detections the model returns (above the threshold it runs with)."""

    def __init__(self) -> None:
        self.count = 0
        original = engine.Predictor.predict
        counter = self

        def counted(predictor, decoded):
            results = original(predictor, decoded)
            counter.count += sum(len(r.scores) for r in results)
            return results

        engine.Predictor.predict = counted

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def cache_models() -> None:
    """Load each model (weights, threshold) once: a model's build is not what is measured."""
    loaded: dict = {}
    original = engine.Predictor.load.__func__

    def load(cls, *args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = original(cls, *args, **kwargs)
        return loaded[key]

    engine.Predictor.load = classmethod(load)


def example(name: str):
    """examples/NAME.py (scripts, not a package), loaded by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def shapes_images(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        image, _ = example("synthetic_shapes").make_image(rng, 256)
        cv2.imwrite(str(folder / f"shapes_{k:03d}.png"), image[..., ::-1])
    return folder


def run_case(title: str, source: Path, weights: str, variants: dict[str, dict], rounds: int, unit: str,
             watches: dict[str, Stopwatch], found: DetectionCounter, out: Path) -> None:
    """Each variant once per round, interleaved; wall time (the run's own clock) and this process's
    CPU time (all its threads: less disturbed by other work on a shared machine) per unit."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    own: dict[str, list[float]] = {name: [] for name in variants}
    written: dict[str, float] = {}
    model_found: dict[str, float] = {}
    count = 0
    for round_number in range(rounds + 1):  # round 0 warms up (model load, oneDNN primitives); not counted
        for name, extra in variants.items():
            for watch in watches.values():
                watch.take()
            found.take()
            cpu_start = time.process_time()
            summary = run_predict(PredictOptions(sources=[str(source)], out=str(out), weights=weights, device="cpu",
                                                 workers=0, progress=False, quiet=True, **extra))
            cpu_seconds = time.process_time() - cpu_start
            count = max(summary.images + summary.frames, 1)
            if round_number:
                wall[name].append(summary.seconds / count)
                cpu[name].append(cpu_seconds / count)
                own[name].append(sum(watch.take()[0] for watch in watches.values()) / count)
                written[name] = summary.detections / count
                model_found[name] = found.take() / count
    base = next(iter(variants))
    print(f"\n{title} ({count} {unit}, median of {rounds} rounds; x: time against the first line)")
    per = unit[:-1]
    print(f"  {'variant':<32} {unit + '/s':>9} {'wall x':>7} {'CPU ms/' + per:>13} {'CPU x':>6} "
          f"{'own ms/' + per:>12} {'found/' + per:>11} {'written/' + per:>13}")
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:<32} {1 / w:>9.2f} {w / statistics.median(wall[base]):>6.2f}x {1000 * c:>13.1f} "
              f"{c / statistics.median(cpu[base]):>5.2f}x {1000 * statistics.median(own[name]):>12.2f} "
              f"{model_found[name]:>11.1f} {written[name]:>13.1f}")


def seeded_model(path: Path, calibration: list[Path]) -> str:
    """segcli's small architecture, seeded, its classifier scaled so that it finds about 10
    detections above 0.5 on the `calibration` images (and many more below: a trained model's
    spread of scores)."""
    arch = "maskrcnn_resnet18_fpn_small"
    state = seeded_state_dict(arch, calibration)
    save_checkpoint(path, state, arch, coco_categories(), coco_label_to_category_id(), {"seed": 0})
    return str(path)


def first_frames(video: Path, count: int, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    capture, paths = cv2.VideoCapture(str(video)), []
    for k in range(count):
        ok, frame = capture.read()
        if ok:
            paths.append(folder / f"frame_{k}.png")
            cv2.imwrite(str(paths[-1]), frame)
    capture.release()
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=60, help="frames of the pedestrian clip and the shapes video")
    parser.add_argument("--images", type=int, default=12, help="synthetic shapes images")
    parser.add_argument("--photos", type=int, default=8, help="coco_tiny photos")
    parser.add_argument("--cases", default="video-seeded,video-demo,images-demo,photos-seeded")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    cache_models()
    watches = {"track": Stopwatch(VideoTracks, "assign"), "review": Stopwatch(ReviewQueue, "add")}
    found = DetectionCounter()
    track = {"track": TrackSettings()}
    with tempfile.TemporaryDirectory(prefix="segcli-bench-") as folder:
        folder = Path(folder)
        out = folder / "out.jsonl"
        review = ReviewSettings(str(folder / "review.csv"))
        flip = ReviewSettings(str(folder / "review.csv"), flip=True)
        if "video-seeded" in cases:
            if not PEDESTRIANS.exists():
                raise SystemExit(f"{PEDESTRIANS} is missing (../shared/data beside the project)")
            clip = looped_video(PEDESTRIANS, args.frames, 480, folder / "pedestrians")
            seeded = seeded_model(folder / "seeded_video.pt", first_frames(clip, 2, folder / "calibration"))
            run_case("video, seeded model: --track", clip, seeded,
                     {"predict": {}, "predict --track": track}, args.rounds, "frames", watches, found, out)
        if "video-demo" in cases:
            clip = folder / "shapes.avi"
            example("moving_shapes").generate(clip, frames=args.frames)
            run_case("video, demo model: --track", clip, "shapes_demo",
                     {"predict": {}, "predict --track": track}, args.rounds, "frames", watches, found, out)
        if "images-demo" in cases:
            images = shapes_images(folder / "shapes", args.images)
            run_case("images, demo model: --review", images, "shapes_demo",
                     {"predict": {}, "predict --review": {"review": review},
                      "predict --review --review-flip": {"review": flip}}, args.rounds, "images", watches, found, out)
        if "photos-seeded" in cases:
            photos = folder / "photos"
            photos.mkdir()
            for photo in real_photos(args.photos):
                (photos / photo.name).symlink_to(photo)
            seeded = seeded_model(folder / "seeded_photos.pt", real_photos(2))
            run_case("photos, seeded model: --review", photos, seeded,
                     {"predict": {}, "predict --review": {"review": review}}, args.rounds, "images", watches, found, out)
    print("\n(own: time inside the tracker or the review queue; found: detections the model returned, mirror "
          "images' included; written: those above --score-thr. The rest of a cost is model work on the found ones.)")


if __name__ == "__main__":
    main()
