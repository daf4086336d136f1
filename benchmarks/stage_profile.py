"""Where `segcli predict` spends its time: wall-clock milliseconds per image of each stage.

The run is `run_predict` itself (what the CLI calls, the same defaults), with a clock wrapped
around the functions that make up each stage for the duration of the run:

  decode      read_image (in the background decoding thread: overlaps the model)
  preprocess  collate + normalize, resize, pad (prepare_batch)
  backbone    ResNet body + FPN
  rpn         RPN head, anchors, top-k, proposal NMS
  box head    RoIAlign for the proposals, box head, scores, class NMS
  mask head   RoIAlign for the detections, mask head, own-class logits
  paste       28x28 masks into the crops around their boxes (CPU) or image-size masks (GPU)
  rle         COCO RLE encoding (from the crops on the CPU, pycocotools on the GPU)
  writing     records, the resume journal, the COCO file
  other       the rest of the loop: the wall time minus the stages above (decode excluded)

The images run once untimed first, so every image size has its oneDNN primitives made, as in
the second half of the CLI benchmark's 2N-image run.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch

STAGES = ("decode", "preprocess", "backbone", "rpn", "box head", "mask head", "paste", "rle", "writing")


class StageClock:
    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.synchronize = synchronize or (lambda: None)
        self._restore: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, stage: str) -> None:
        original = getattr(owner, name, None)
        if original is None:  # moved by a refactor: its time shows under "other"
            return

        def timed(*args, **kwargs):
            self.synchronize()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.synchronize()
                self.seconds[stage] += time.perf_counter() - start

        # Instance attributes are restored by deleting them; class and module ones by resetting.
        had_own = isinstance(owner, torch.nn.Module) and name in vars(owner)
        self._restore.append((owner, name, original if (not isinstance(owner, torch.nn.Module) or had_own) else None))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self._restore):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._restore.clear()


@contextlib.contextmanager
def clocked(model, clock: StageClock) -> Iterator[StageClock]:
    """Wrap the stages of `model` (a loaded segcli MaskRCNN) and of the predict pipeline."""
    import segcli.data.decode as decode
    import segcli.predict.core as predict
    import segcli.model.maskrcnn as maskrcnn
    from segcli.writers.journal import Journal

    clock.wrap(decode, "read_image", "decode")
    clock.wrap(predict, "collate", "preprocess")
    clock.wrap(maskrcnn, "prepare_batch", "preprocess")
    clock.wrap(model.backbone, "forward", "backbone")
    clock.wrap(model.rpn, "forward", "rpn")
    clock.wrap(model.roi_heads, "detect", "box head")
    clock.wrap(model.roi_heads, "mask_probabilities", "mask head")
    clock.wrap(maskrcnn.Detections, "paste_masks", "paste")  # the GPU's image-size paste
    clock.wrap(maskrcnn, "paste_mask_crops", "paste")  # the CPU's paste into crops
    clock.wrap(maskrcnn, "encode_masks", "rle")
    clock.wrap(maskrcnn, "crop_to_rle", "rle")
    clock.wrap(predict, "build_record", "writing")
    clock.wrap(Journal, "add_records", "writing")
    clock.wrap(Journal, "done", "writing")
    if hasattr(predict, "_Run"):
        clock.wrap(predict._Run, "_assemble", "writing")
    try:
        yield clock
    finally:
        clock.restore()


def profile_predict(sources: list[str], weights: str, out_dir: Path, precision: str = "auto",
                    device: str = "cpu", score_thr: float = 0.5) -> tuple[dict[str, float], float, int, str]:
    """({stage: ms per image}, total ms per image, images, resolved precision) of one warm run."""
    import segcli.predict.core as predict
    from segcli.predict.options import PredictOptions
    from segcli.predict.run import run_predict

    loaded: list = []
    original_load = predict.Predictor.load

    def keep_loaded(*args, **kwargs):
        if not loaded:
            loaded.append(original_load(*args, **kwargs))
        return loaded[0]

    predict.Predictor.load = keep_loaded  # the warm-up run's model serves the timed run
    try:
        def run(name: str):
            options = PredictOptions(sources=sources, out=str(out_dir / f"{name}.json"), weights=weights,
                                             device=device, precision=precision, score_thr=score_thr,
                                             quiet=True, progress=False)
            return run_predict(options, stderr=io.StringIO())

        run("warm-up")
        model = loaded[0].model
        sync = torch.cuda.synchronize if loaded[0].device.type == "cuda" else None
        with clocked(model, StageClock(sync)) as clock:
            summary = run("profiled")
    finally:
        predict.Predictor.load = original_load
    images = summary.images + summary.frames
    per_image = {stage: 1000 * clock.seconds.get(stage, 0.0) / images for stage in STAGES}
    total = 1000 * summary.seconds / images
    return per_image, total, images, model.precision


def format_profile(per_image: dict[str, float], total: float) -> list[str]:
    accounted = sum(ms for stage, ms in per_image.items() if stage != "decode")
    rows = [(stage, ms) for stage, ms in per_image.items()] + [("other", max(total - accounted, 0.0)), ("total", total)]
    lines = [f"  {'stage':12} {'ms/img':>8} {'share':>6}"]
    for stage, ms in rows:
        share = "" if stage == "total" else f"{ms / total:>6.0%}"
        note = "  (background thread, overlaps the model)" if stage == "decode" else ""
        lines.append(f"  {stage:12} {ms:>8.1f} {share:>6}{note}")
    return lines
