"""`segcli predict SOURCE... --ray`: prediction on a Ray cluster with Ray Data's batch-inference
pattern, writing the same outputs as one process.

The inputs (expanded, named and sliced exactly as for one process) become a Ray Dataset
(`ray.data.from_items`); `map_batches` runs a callable class, `PredictActor`, as a pool of actors,
each loading the model once and predicting whole inputs (a video stays on one actor, frame after
frame). Ray schedules the actors (one GPU each when the cluster has GPUs) and feeds them; segcli
adds no scheduler. Results come back to this process (the driver) in input order and go through
the same writing path as one process (segcli.predict.loop): the resume journal, per-image writers, the one-file
formats assembled in input order. Polygons (GeoJSON, LabelMe, YOLO, `--masks polygon`) are
therefore traced on the driver.

Ray is optional (`pip install "segcli[ray]"`); without it `--ray` is one line and exit code 3.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from segcli.errors import ExitCode, SegcliError, ServiceError, UsageError, WeightsError

if TYPE_CHECKING:
    from segcli.predict.slicing import SliceSettings

INSTALL_HINT = 'pip install "segcli[ray]"'
CPUS_PER_ACTOR = 4  # without GPUs: one model per 4 CPUs unless --ray-actors says otherwise
# Joining a cluster at an address: Ray itself retries an unreachable GCS for ever, so a cron job
# given a wrong address would hang. A TCP connect first (seconds), then a limit on ray.init.
JOIN_TIMEOUT_ENV = "SEGCLI_RAY_TIMEOUT"
JOIN_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the extra installs ray[data]; plain `ray` lacks its dependencies)
    except ImportError:
        raise WeightsError(f"--ray needs Ray (with Ray Data), which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class ActorSettings:
    """What every actor needs to load the model and read inputs as one process would."""

    weights: str
    arch: str | None
    device: str
    precision: str
    score_thr: float
    max_det: int
    classes: tuple[str, ...] | None
    vid_stride: int
    batch_size: int
    workers: int
    slicing: SliceSettings | None = None  # None: --slice off


@dataclass
class InputOutcome:
    """One input's results on an actor: its images' or frames' predictions, or why it failed."""

    predictions: list = field(default_factory=list)  # segcli.predict.core.ImagePrediction
    error: str | None = None
    video_done: bool = False  # a video whose frames were read (possibly ending early: `note`)
    note: str | None = None


class PredictActor:
    """Ray Data's callable class: one model per actor, a batch of inputs per call."""

    def __init__(self, settings: ActorSettings) -> None:
        from segcli.predict.core import Predictor

        self.settings = settings
        self.predictor = Predictor.load(settings.weights, settings.arch, settings.device, settings.precision,
                                        settings.score_thr, settings.max_det, progress=False,
                                        classes=list(settings.classes) if settings.classes else None)
        if settings.slicing is not None:  # huge images are sliced on the actor, as in one process
            from segcli.predict.slicing import SlicedPredictor

            self.predictor = SlicedPredictor(self.predictor, settings.slicing, settings.max_det, settings.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from segcli.data.decode import InputDone, iter_decoded
        from segcli.data.sources import InputItem
        from segcli.predict.core import batches

        settings = self.settings
        inputs = [InputItem(Path(str(path)), str(name)) for path, name in zip(batch["path"], batch["file_name"])]
        outcomes = [InputOutcome() for _ in inputs]
        decoded = iter_decoded(inputs, workers=settings.workers, prefetch=max(8, 2 * settings.batch_size),
                               vid_stride=settings.vid_stride)
        try:
            for event in batches(decoded, settings.batch_size):
                if isinstance(event, list):
                    for frame, result in zip(event, self.predictor.predict(event)):
                        outcomes[frame.index].predictions.append(result)
                elif isinstance(event, InputDone):
                    outcomes[event.index].video_done, outcomes[event.index].note = True, event.note
                else:
                    outcomes[event.index].error = event.error
        finally:
            decoded.close()
        return {"index": batch["index"], "outcome": np.array([pickle.dumps(o) for o in outcomes], dtype=object)}


def driver_model(options, show_progress: bool):
    """Check what can be checked before a cluster starts (Ray installed, the flags), and load the
    model in this process: weight and --classes mistakes are one line, and the writers need its
    categories. Returns a Predictor (on the CPU; the actors load their own)."""
    from segcli.predict.core import Predictor

    require_ray()
    if options.overlay is not None:
        raise UsageError("--overlay does not work with --ray: the frames stay on the actors")
    if options.track is not None or options.review is not None:  # the tracker's and the queue's state is one process's
        raise UsageError(f"{'--track' if options.track is not None else '--review'} runs in one process, not on Ray: "
                         f"use --shard K/N or torchrun to spread it")
    if options.ray_actors is not None and options.ray_actors < 1:
        raise UsageError(f"--ray-actors must be at least 1, got {options.ray_actors}")
    return Predictor.load(options.weights, options.arch, "cpu", "fp32", options.score_thr, options.max_det,
                          progress=show_progress, classes=options.classes)


def run_on_ray(options, plan, model_here, items: list, stems: list[str], keys: list[str], todo: list[int], journal,
               stderr: TextIO, show_progress: bool):
    """Predict `todo` (positions in `items`) on Ray; `model_here` is `driver_model`'s. The results
    go through the same run loop, stages and sinks as in one process. Returns the PredictSummary."""
    from segcli.predict.loop import RunContext
    from segcli.predict.pipeline import build_loop
    from segcli.progress import Progress

    ray = require_ray()
    started = time.perf_counter()
    joined = not ray.is_initialized()
    if joined:
        _join(ray, options)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # "execution finished", "progress bars disabled"
    try:
        context = RunContext(options, plan, model_here, items, stems, keys, todo, journal, stderr)
        loop = build_loop(context)
        if todo:
            dataset = _dataset(ray, options, items, todo)
            finished = 0
            with Progress(len(todo), enabled=show_progress, stream=stderr) as progress, loop.stopping_early():
                for row in _rows(dataset):
                    index, outcome = int(row["index"]), pickle.loads(row["outcome"])
                    if outcome.error is not None:
                        finished += loop.failed(index, outcome.error)
                    for prediction in outcome.predictions:
                        finished += loop.result(index, None, prediction)
                    if outcome.video_done:
                        finished += loop.video_done(index, outcome.note)
                    progress.update(finished)
        loop.finish()
        loop.summary.seconds = time.perf_counter() - started
        return loop.summary
    finally:
        if joined:
            ray.shutdown()


def check_cluster(options) -> None:
    """Before any work: Ray importable and, unless this process already runs a cluster, the
    address to join (--ray-address, else RAY_ADDRESS) reachable; one line otherwise."""
    ray = require_ray()
    if ray.is_initialized():
        return
    join_timeout()  # a bad SEGCLI_RAY_TIMEOUT is a usage error before any work
    address, named_by = _address(options)
    if address is None or address in ("auto", "local"):
        return  # a cluster on this machine (ray.init says so at once if there is none) or a new one
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"{named_by} {address!r}: give HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except TimeoutError:
        raise ServiceError(f"cannot reach the Ray cluster at {address} ({named_by}): "
                           f"no answer within {CONNECT_TIMEOUT_S:g} s") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ServiceError(f"cannot reach the Ray cluster at {address} ({named_by}): {reason.lower()}") from None


def _address(options) -> tuple[str | None, str]:
    if options.ray:
        return options.ray, "--ray-address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


def join_timeout() -> float:
    text = os.environ.get(JOIN_TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else JOIN_TIMEOUT_S
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{JOIN_TIMEOUT_ENV}={text!r}: give the seconds ray.init may take to join, a number above 0")
    return value


def _join(ray, options) -> None:
    """ray.init: join the cluster at the address, or start one here. A cluster that takes the TCP
    connection but never answers as Ray would keep ray.init retrying for ever: past the limit, one
    line and exit code 3 (the process exits from the watchdog thread, as ray.init cannot be cut)."""
    address, named_by = _address(options)
    limit = join_timeout()
    watchdog = None
    if address not in (None, "local"):
        watchdog = threading.Timer(limit, _give_up, (address, named_by, limit))
        watchdog.daemon = True
        watchdog.start()
    try:
        # Workers' stdout would reach this process's stdout, which carries data only.
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
    except ConnectionError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServiceError(f"cannot join the Ray cluster at {address} ({named_by}): {reason}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()


def _give_up(address: str, named_by: str, limit: float) -> None:
    sys.stderr.write(f"segcli: error: the Ray cluster at {address} ({named_by}) did not answer within {limit:g} s "
                     f"({JOIN_TIMEOUT_ENV} sets the limit)\n")
    sys.stderr.flush()
    os._exit(ExitCode.MODEL)


def _dataset(ray, options, items: list, todo: list[int]):
    """The inputs as a Ray Dataset, mapped by a pool of `PredictActor`s."""
    from ray.data import DataContext

    from segcli.predict.slicing import SliceSettings

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    on_gpus = gpus > 0 and options.device != "cpu"
    actors = options.ray_actors or (gpus if on_gpus else max(1, cpus // CPUS_PER_ACTOR))
    batch_size = options.batch_size or (8 if on_gpus else 1)
    settings = ActorSettings(
        # Ray shows each GPU actor its own GPU only, as device 0: cuda:N would name another.
        weights=options.weights, arch=options.arch, device="cuda" if on_gpus else "cpu",
        precision=options.precision, score_thr=options.score_thr, max_det=options.max_det,
        classes=tuple(options.classes) if options.classes else None, vid_stride=options.vid_stride,
        batch_size=batch_size, workers=options.workers if options.workers is not None else 1,
        slicing=SliceSettings.of(options),
    )
    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # results in input order: stdout lines as one process
    context.enable_progress_bars = False  # segcli draws its own
    context.print_on_execution_start = False
    rows = [{"index": i, "path": str(items[i].path), "file_name": items[i].file_name} for i in todo]
    # Ray sets each CPU actor's thread count (OMP_NUM_THREADS) from its num_cpus.
    resources_per_actor = {"num_gpus": 1} if on_gpus else {"num_cpus": max(1, cpus // actors)}
    return ray.data.from_items(rows).map_batches(
        PredictActor, fn_constructor_kwargs={"settings": settings}, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), **resources_per_actor)


def _rows(dataset):
    """The dataset's rows; an actor's own SegcliError (a model that loads here but not on a node)
    becomes that one line, not Ray's wrapped traceback."""
    try:
        yield from dataset.iter_rows()
    except SegcliError:
        raise
    except Exception as exc:  # Ray wraps errors raised on actors, sometimes twice
        cause = _segcli_cause(exc)
        if cause is None:
            raise
        raise cause from None


def _segcli_cause(exc: BaseException | None, depth: int = 0) -> SegcliError | None:
    if exc is None or depth > 8:
        return None
    if isinstance(exc, SegcliError):
        return exc
    for inner in (getattr(exc, "cause", None), exc.__cause__, exc.__context__):
        if isinstance(inner, BaseException) and (found := _segcli_cause(inner, depth + 1)) is not None:
            return found
    return None
