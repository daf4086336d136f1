"""CPU images/s of segcli against the runtimes a user would pick instead, in one run.

    python benchmarks/cpu_runtimes.py [--models demo,r50,r50v2] [--images N] [--rounds 3] [--score-thr 0.5]
    python benchmarks/cpu_runtimes.py --quick        # about 3 minutes on 2 cores

One process, the same photos (../shared/data/coco_tiny, val2017 first), the same weights for every
row, end to end from JPEG files to a COCO results file (decode, inference, threshold, masks pasted
and RLE-encoded, JSON written), one photo at a time except where a runtime batches by itself:

  plain        torchvision's Mask R-CNN, PIL decode, fp32, pycocotools encode per mask
  tuned        the same with bf16 autocast + channels_last (torchvision's CPU advice)
  segcli       `segcli predict` in this process, default precision (--precision auto), its own
               clock (decode threads, batching, writing), as benchmarks/predict_throughput.py
  segcli-2s    the same with `--streams 2` (two photos at a time, each on half the threads; bf16
               results are then a 1-thread run's on 2 cores)
  segcli+ort   `segcli predict --weights model.onnx` (the export through segcli's pipeline)
  segcli-int8  `segcli quantize --out model-int8.pt` (calibrated on 16 other coco_tiny photos), then
               `segcli predict --weights model-int8.pt`: int8 layers inside segcli's own pipeline
  int8-onnx    the same with `--out model-int8.onnx` (ONNX Runtime's QDQ file through segcli predict);
               both int8 rows are skipped on CPUs without VNNI / AMX-INT8, where they are refused
  ort          `segcli export --format onnx` in ONNX Runtime (CPU EP, ORT_ENABLE_ALL), a user's
               loop: PIL decode, session.run, torchvision's paste_masks_in_image, encode, JSON
  ov-latency   the same ONNX file read by OpenVINO (CPU plugin, PERFORMANCE_HINT=LATENCY), same loop
  ov-thruput   OpenVINO with PERFORMANCE_HINT=THROUGHPUT: an AsyncInferQueue of the plugin's
               optimal number of requests (streams), decode overlapping inference

Models: `demo` (the shipped maskrcnn_resnet18_fpn_tiny shapes model, weights/), `r50` (R50-FPN v1
with seeded random weights, classifier scaled to about 10 detections per image at 0.5, as
benchmarks.common.seeded_state_dict), `r50v2` (R50-FPN v2, torchvision's maskrcnn_resnet50_fpn_v2:
BatchNorm in the FPN and heads, a 4-conv box head; seeded and scaled the same way), `r50-raw`
(torchvision's own random initialisation: almost no detections, so the mask stage costs nothing).

Rounds: every round runs every row once on the same photos, in a rotated order, after one untimed
warm-up photo per row. Printed: each round's images/s and ratio to plain, then per row the median
images/s, the median ratio and its spread (min..max over rounds), detections per image and the
share of plain fp32's detections each row reproduces (segcli.model.parity's contract: label, box
within 0.5 px, score within 1e-3, mask IoU >= 0.98), and COCO mask AP with plain fp32's detections as
the ground truth (bf16 moves scores by more than 1e-3, so it is judged by the AP). The machine is
shared: read the spread before the median.

Then the compute floor (benchmarks/compute_floor.py: multiply-accumulates per image over the
fastest rate oneDNN's convolutions reached here), each row's share of it, and the most the ratio
targets can reach at it: a target above its ceiling needs fewer multiply-accumulates or faster
kernels, not less overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cli_throughput import load_line  # noqa: E402
from benchmarks.common import COCO_TINY, seeded_state_dict, torchvision_model  # noqa: E402
from benchmarks.predict_throughput import mask_ap, match_fraction, read_coco_predictions  # noqa: E402
from segcli.categories import COCO_LABELS  # noqa: E402
from segcli.device import cpu_flags, cpu_has_fast_bf16, resolve_precision  # noqa: E402
from segcli.export.run import ExportOptions, run_export  # noqa: E402
from segcli.predict.options import PredictOptions  # noqa: E402
from segcli.predict.run import run_predict  # noqa: E402
from segcli.weights import resolve_weights, save_checkpoint  # noqa: E402

ROWS = ("plain", "tuned", "segcli", "segcli-2s", "segcli+ort", "segcli-int8", "int8-onnx", "ort", "ov-latency", "ov-thruput")
OTHER_RUNTIMES = ("ort", "ov-latency", "ov-thruput")  # what a CPU user would pick instead of segcli
# Issue 23's targets: segcli's default precision over the fastest other runtime and over the plain
# loop, and int8 over segcli's bf16.
TARGET_OVER_OTHERS, TARGET_OVER_PLAIN, TARGET_INT8 = 1.3, 8, 1.6
CALIBRATION_PHOTOS = 16
DEMO_PHOTOS = 18  # of coco_tiny's 38: the 16 calibration photos follow them
R50_PHOTOS = 6  # a round of 6 takes 6 to 35 s on 2 cores: long against the noise already
R50 = "maskrcnn_resnet50_fpn"
ARCH_OF = {"r50": R50, "r50v2": "maskrcnn_resnet50_fpn_v2", "r50-raw": R50}
MODELS = ("demo", *ARCH_OF)


# -- the machine -------------------------------------------------------------------------------
def cpu_line() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
    have = [f for f in wanted if f in flags]
    missing = [f for f in wanted if f not in flags]
    return f"{model}, {os.cpu_count()} cores; flags: {' '.join(have) or '-'}; absent: {' '.join(missing)}"


def kernels_line() -> str:
    import onnxruntime

    parts = [f"torch {torch.__version__} ({torch.get_num_threads()} threads, ATen CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}, oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'})",
             f"segcli --precision auto -> {resolve_precision('auto', torch.device('cpu'))}",
             f"onnxruntime {onnxruntime.__version__}"]
    try:
        import openvino

        parts.append(f"openvino {openvino.__version__}")
    except ImportError:
        parts.append("openvino missing")
    return "; ".join(parts)


# -- results -----------------------------------------------------------------------------------
def record(results: list, detections: dict, name: str, image_id: int, boxes, scores, category_ids, masks) -> None:
    """Encode one image's kept detections; append COCO results rows and keep them for the parity check."""
    masks = np.asarray(masks, dtype=bool)
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    for box, score, category, rle in zip(boxes.tolist(), scores.tolist(), category_ids.tolist(), rles):
        x0, y0, x1, y1 = box
        results.append({"image_id": image_id, "category_id": int(category), "score": float(score),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    detections[name] = (torch.as_tensor(boxes).reshape(-1, 4).float(), torch.as_tensor(scores).float(),
                        torch.as_tensor(category_ids).long(), torch.from_numpy(masks.reshape(-1, *masks.shape[1:])), rles)


def decode(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def torchvision_loop(model, photos, threshold, tuned, category_of, out):
    results, detections = [], {}
    start = time.perf_counter()
    for image_id, path in enumerate(photos, start=1):
        tensor = torch.from_numpy(decode(path).copy()).permute(2, 0, 1).float() / 255
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if tuned else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            output = model([tensor])[0]
        keep = output["scores"] > threshold
        masks = (output["masks"][keep, 0] > 0.5).numpy()
        record(results, detections, path.name, image_id, output["boxes"][keep].float(), output["scores"][keep].float(),
               category_of[output["labels"][keep]], masks)
    Path(out).write_text(json.dumps(results))
    return time.perf_counter() - start, detections


def postprocess(outputs, image, threshold, category_of):
    boxes, scores, labels, masks = (torch.from_numpy(np.asarray(o)) for o in outputs[:4])
    keep = scores > threshold
    pasted = paste_masks_in_image(masks[keep][:, None], boxes[keep], image.shape[:2])[:, 0] > 0.5
    return boxes[keep], scores[keep], category_of[labels[keep].long()], pasted.numpy()


def runtime_loop(infer, photos, threshold, category_of, out):
    """A user's loop around an exported model: `infer(feeds)` returns its five outputs."""
    results, detections = [], {}
    start = time.perf_counter()
    for image_id, path in enumerate(photos, start=1):
        image = decode(path)
        outputs = infer({"images": image[None], "sizes": np.array([image.shape[:2]], dtype=np.int64)})
        record(results, detections, path.name, image_id, *postprocess(outputs, image, threshold, category_of))
    Path(out).write_text(json.dumps(results))
    return time.perf_counter() - start, detections


def openvino_async_loop(compiled, photos, threshold, category_of, out):
    """THROUGHPUT hint: the plugin's optimal number of requests in flight, results post-processed in order."""
    import openvino as ov

    queue = ov.AsyncInferQueue(compiled, 0)
    raw: dict[int, list] = {}
    queue.set_callback(lambda request, index: raw.__setitem__(index, [t.data.copy() for t in request.output_tensors]))
    results, detections, images = [], {}, {}
    start = time.perf_counter()
    for index, path in enumerate(photos):
        image = images[index] = decode(path)
        queue.start_async({"images": image[None], "sizes": np.array([image.shape[:2]], dtype=np.int64)}, index)
    queue.wait_all()
    for index, path in enumerate(photos):
        record(results, detections, path.name, index + 1, *postprocess(raw[index], images[index], threshold, category_of))
    Path(out).write_text(json.dumps(results))
    return time.perf_counter() - start, detections


def segcli_loop(weights, photos, threshold, out, streams=None):
    options = PredictOptions(sources=[str(p) for p in photos], out=str(out), weights=str(weights), device="cpu",
                             precision="auto", batch_size=1, score_thr=threshold, quiet=True, progress=False,
                             streams=streams)
    summary = run_predict(options, stderr=io.StringIO())  # its loop's clock: not the weights' loading
    return summary.seconds, read_coco_predictions(out)


# -- the rows for one model ----------------------------------------------------------------------
def openvino_compiled(onnx_path: Path, hint: str, threads: int):
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": hint}
    if hint == "LATENCY":
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
    return compiled


def openvino_kernels(compiled) -> str:
    """The CPU plugin's own account: inference precision, streams, threads, and its kernel types."""
    counts: dict[str, int] = {}
    for node in compiled.get_runtime_model().get_ops():
        info = node.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in ("Convolution", "FullyConnected", "MatMul"):
            kind = info["primitiveType"].astype(str) if "primitiveType" in info else "?"
            counts[kind] = counts.get(kind, 0) + 1
    props = {key: str(compiled.get_property(key)) for key in
             ("INFERENCE_PRECISION_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "OPTIMAL_NUMBER_OF_INFER_REQUESTS")}
    return ", ".join(f"{k}={v}" for k, v in props.items()) + "; conv/fc kernels " + \
        ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def prepare_model(kind: str, photos: list[Path], tmp: Path, log):
    """(checkpoint path or name, torchvision twin, category id per model label, arch, description)."""
    if kind == "demo":
        checkpoint = resolve_weights("shapes_demo")
        state, arch, weights = checkpoint.state_dict, checkpoint.arch, "shapes_demo"
        label_to_category = checkpoint.label_to_category_id
        describe = f"shipped demo weights ({arch})"
    else:
        arch = ARCH_OF[kind]
        if kind != "r50-raw":
            log("finding the classifier scale for about 10 detections per image ...")
            state = seeded_state_dict(arch, photos[:2])
            describe = f"{arch}, seeded random weights, classifier scaled (~10 detections/image)"
        else:
            torch.manual_seed(0)
            state = torchvision_model(arch).state_dict()
            describe = f"{arch} v1, torchvision's own random initialisation (seed 0)"
        weights = tmp / f"{kind}.pt"
        categories = [{"id": i, "name": name} for i, name in enumerate(COCO_LABELS) if i]
        label_to_category = list(range(len(COCO_LABELS)))
        save_checkpoint(weights, state, arch, categories, label_to_category, {"seed": 0})
    twin = torchvision_model(arch, num_classes=len(label_to_category))
    twin.load_state_dict(state)
    return weights, twin.eval(), torch.tensor(label_to_category), arch, describe


def build_rows(kind, photos, threshold, tmp: Path, log, skip: set[str], calibration: list[Path]):
    weights, twin, category_of, arch, describe = prepare_model(kind, photos, tmp, log)
    threads = torch.get_num_threads()
    rows, notes = {}, []
    out = lambda name: tmp / f"{kind}-{name}.json"  # noqa: E731

    def tuned_run(p, o):
        twin.to(memory_format=torch.channels_last)
        try:
            return torchvision_loop(twin, p, threshold, True, category_of, o)
        finally:
            twin.to(memory_format=torch.contiguous_format)

    rows["plain"] = lambda p, o: torchvision_loop(twin, p, threshold, False, category_of, o)
    rows["tuned"] = tuned_run
    rows["segcli"] = lambda p, o: segcli_loop(weights, p, threshold, o)
    rows["segcli-2s"] = lambda p, o: segcli_loop(weights, p, threshold, o, streams=2)
    onnx_path = tmp / f"{kind}.onnx"
    log(f"segcli export --format onnx ({arch}) ...")
    started = time.perf_counter()
    run_export(ExportOptions(weights=str(weights), format="onnx", out=str(onnx_path), verify=False))
    notes.append(f"export: {onnx_path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - started:.0f} s (opset 17, dynamic batch and size)")
    rows["segcli+ort"] = lambda p, o: segcli_loop(onnx_path, p, threshold, o)
    for name, suffix in (("segcli-int8", "pt"), ("int8-onnx", "onnx")):
        if name not in skip:
            int8_row(rows, notes, name, weights, calibration, tmp / f"{kind}-int8.{suffix}", threshold, log)
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.intra_op_num_threads = threads
    session_options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), session_options, providers=["CPUExecutionProvider"])
    notes.append(f"ort: providers {session.get_providers()}, ORT_ENABLE_ALL, intra_op_num_threads={threads}")
    rows["ort"] = lambda p, o: runtime_loop(lambda feeds: session.run(None, feeds), p, threshold, category_of, o)
    try:
        latency = openvino_compiled(onnx_path, "LATENCY", threads)
        throughput = openvino_compiled(onnx_path, "THROUGHPUT", threads)
    except ImportError:
        notes.append('openvino: not installed (pip install "segcli[openvino]"); its rows are skipped')
    except Exception as error:  # OpenVINO's own exception types: say why the ONNX file could not be read
        notes.append(f"openvino: cannot read/compile the export: {' '.join(str(error).split())[:400]}")
    else:
        notes.append(f"ov-latency: {openvino_kernels(latency)}")
        notes.append(f"ov-thruput: {openvino_kernels(throughput)}")
        rows["ov-latency"] = lambda p, o: runtime_loop(lambda feeds: list(latency(feeds).values()), p, threshold, category_of, o)
        rows["ov-thruput"] = lambda p, o: openvino_async_loop(throughput, p, threshold, category_of, o)
    rows = {name: run for name, run in rows.items() if name not in skip}
    return rows, out, describe, notes


def int8_row(rows, notes, name, weights, calibration: list[Path], path: Path, threshold, log) -> None:
    """`segcli quantize` on photos the rounds do not time (.pt: segcli's own int8 pipeline; .onnx:
    ONNX Runtime's QDQ file); the row runs the file through segcli predict."""
    from segcli.device import cpu_int8_dot_product
    from segcli.export.quantize import QuantizeOptions
    from segcli.export.quantize_native import quantize

    if cpu_int8_dot_product() is None:
        notes.append(f"{name}: skipped, this CPU has no VNNI / AMX-INT8 (segcli refuses int8 files there)")
        return
    log(f"segcli quantize --out {path.name} on {len(calibration)} photos ...")
    summary = quantize(QuantizeOptions(weights=str(weights), images=[str(c) for c in calibration], out=str(path),
                                       calibration_images=len(calibration), min_agreement=0.0, check_export=False))
    notes.append(f"{name}: {summary.quantized_layers} layers, {summary.bytes / 1e6:.0f} MB, quantized in "
                 f"{summary.seconds:.0f} s on {len(summary.calibration)} photos; {summary.agreement}")
    rows[name] = lambda p, o: segcli_loop(path, p, threshold, o)


def rows_weights(kind: str, tmp: Path):
    return "shapes_demo" if kind == "demo" else tmp / f"{kind}.pt"


def print_profile(weights, photos, threshold, tmp: Path) -> None:
    """segcli's per-stage profile (benchmarks/stage_profile.py) on the same photos: why its row is where it is."""
    from benchmarks.stage_profile import format_profile, profile_predict

    per_image, total, images, precision = profile_predict([str(p) for p in photos], str(weights), tmp, score_thr=threshold)
    print(f"  segcli per-stage profile ({images} photos, {precision}, {load_line()}):")
    print("\n".join("  " + line for line in format_profile(per_image, total)))


def bench_model(kind, photos, rounds, threshold, tmp, skip, calibration, profile=False):
    log = lambda message: print(f"  [{kind}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    rows, out, describe, notes = build_rows(kind, photos, threshold, tmp, log, skip, calibration)
    print(f"\nmodel {kind}: {describe}; {len(photos)} photos "
          f"({', '.join(sorted({'x'.join(map(str, Image.open(p).size)) for p in photos}))}), score > {threshold}")
    for note in notes:
        print(f"  {note}")
    for name, run in rows.items():
        log(f"warm-up: {name}, one photo ...")
        run(photos[:1], out(name))
    seconds = {name: [] for name in rows}
    detections = {}
    order = list(rows)
    for round_index in range(rounds):
        turn = order[round_index % len(order):] + order[:round_index % len(order)]
        for name in turn:
            log(f"round {round_index + 1}: {name} ...")
            elapsed, found = rows[name](photos, out(name))
            seconds[name].append(elapsed)
            detections.setdefault(name, found)
        rates = {name: len(photos) / seconds[name][-1] for name in order}
        print(f"  round {round_index + 1} ({load_line()}): " + "  ".join(
            f"{name} {rates[name]:.2f}/s" + (f" ({rates[name] / rates['plain']:.2f}x)" if "plain" in rates and name != "plain" else "")
            for name in order), flush=True)
    print(f"  {'row':<11} {'img/s':>6} {'x plain':>8} {'spread':>11} {'dets/img':>8} {'= plain fp32':>12} {'mask AP vs plain':>16}")
    medians = {}
    for name in order:
        rates = [len(photos) / s for s in seconds[name]]
        medians[name] = statistics.median(rates)
        ratio = spread = ""
        if "plain" in seconds:
            ratios = [len(photos) / s / (len(photos) / p) for s, p in zip(seconds[name], seconds["plain"])]
            ratio, spread = f"{statistics.median(ratios):.2f}x", f"{min(ratios):.2f}..{max(ratios):.2f}"
        dets = sum(len(v[1]) for v in detections[name].values()) / len(photos)
        agreement = ap = ""
        if "plain" in detections:
            fraction, total = match_fraction(detections["plain"], detections[name])
            agreement, ap = f"{fraction:.0%} of {total}", f"{mask_ap(detections['plain'], detections[name]):.3f}"
        print(f"  {name:<11} {medians[name]:>6.2f} {ratio:>8} {spread:>11} {dets:>8.1f} {agreement:>12} {ap:>16}")
    others = [n for n in OTHER_RUNTIMES if n in seconds]
    if others and "segcli" in seconds:  # per round, then the median: the same instrument as the table
        versus = [min(seconds[n][r] for n in others) / seconds["segcli"][r] for r in range(rounds)]
        line = f"  segcli / fastest of ORT and OpenVINO: {statistics.median(versus):.2f}x ({min(versus):.2f}..{max(versus):.2f}; target >= {TARGET_OVER_OTHERS}x)"
        if "plain" in seconds:
            plain = [seconds["plain"][r] / seconds["segcli"][r] for r in range(rounds)]
            line += f"; segcli / plain: {statistics.median(plain):.2f}x ({min(plain):.2f}..{max(plain):.2f}; target >= {TARGET_OVER_PLAIN}x)"
        print(line)
    for name in ("segcli-int8", "int8-onnx"):
        if name in seconds and "segcli" in seconds:
            int8 = [seconds["segcli"][r] / seconds[name][r] for r in range(rounds)]
            print(f"  {name} / segcli ({resolve_precision('auto', torch.device('cpu'))}): {statistics.median(int8):.2f}x "
                  f"({min(int8):.2f}..{max(int8):.2f}; target >= {TARGET_INT8}x over bf16)")
    for name in ("segcli-2s", "segcli-int8"):
        if others and name in seconds:
            versus = [min(seconds[n][r] for n in others) / seconds[name][r] for r in range(rounds)]
            print(f"  {name} / fastest of ORT and OpenVINO: {statistics.median(versus):.2f}x ({min(versus):.2f}..{max(versus):.2f})")
    if "segcli-2s" in seconds and "segcli" in seconds:
        two = [seconds["segcli"][r] / seconds["segcli-2s"][r] for r in range(rounds)]
        print(f"  segcli-2s / segcli: {statistics.median(two):.2f}x ({min(two):.2f}..{max(two):.2f})")
    print_floor(rows_weights(kind, tmp), photos, threshold, medians, log)
    if profile:
        print_profile(rows_weights(kind, tmp), photos, threshold, tmp)
    sys.stdout.flush()


def print_floor(weights, photos, threshold, medians: dict[str, float], log) -> None:
    """The compute floor (benchmarks/compute_floor.py) and what it allows each ratio target: how
    close each row came to the most images/s oneDNN's convolutions allow on this machine."""
    from benchmarks.compute_floor import compute_floor

    log("compute floor ...")
    floor = compute_floor(str(weights), photos, threshold)
    limit = 1 / floor.seconds
    print(f"  compute floor: {floor.describe()}")
    print("  share of the floor reached: " + ", ".join(f"{name} {rate / limit:.0%}" for name, rate in medians.items()))
    others = [medians[n] for n in OTHER_RUNTIMES if n in medians]
    ceilings = []
    if "plain" in medians:
        ceilings.append(f"x plain <= {limit / medians['plain']:.2f}x (target {TARGET_OVER_PLAIN}x)")
    if others:
        needed = TARGET_OVER_OTHERS * max(others) / limit
        ceilings.append(f"/ fastest of ORT and OpenVINO <= {limit / max(others):.2f}x "
                        f"(target {TARGET_OVER_OTHERS}x: segcli at {needed:.0%} of the floor)")
    if ceilings:
        print("  ceilings for segcli's precision at the floor: " + "; ".join(ceilings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,r50,r50v2", help="demo, r50 (v1, scaled classifier), r50v2 (v2, scaled classifier), "
                        "r50-raw (v1, torchvision init)")
    parser.add_argument("--images", type=int, default=None, help="photos per round (default: 18 for demo, whose "
                        "6 photos took 0.4 s a round, too short against the machine's noise; 6 for the R50s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--score-thr", type=float, default=0.5)
    parser.add_argument("--skip", default="", help="rows to leave out, e.g. tuned (slow without bf16 hardware)")
    parser.add_argument("--profile", action="store_true", help="also segcli's per-stage profile per model")
    parser.add_argument("--quick", action="store_true", help="demo: 3 photos x 3 rounds; r50: 2 photos x 2 rounds, "
                        "without the tuned row where bf16 is emulated (no AMX / AVX-512 BF16)")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in models:
        if model not in MODELS:
            parser.error(f"--models: unknown {model!r}; choose {', '.join(MODELS)}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(ROWS):
        parser.error(f"--skip: unknown rows {', '.join(sorted(skip - set(ROWS)))}; rows are {', '.join(ROWS)}")
    photos_all = sorted(COCO_TINY.glob("val2017/*.jpg")) + sorted(COCO_TINY.glob("train2017/*.jpg"))
    if not photos_all:
        raise SystemExit(f"no photos under {COCO_TINY}; ../shared/data must be beside the project")
    print("command: " + " ".join(["python", *sys.argv]))
    print("cpu:     " + cpu_line())
    print("kernels: " + kernels_line())
    print(f"start:   {load_line()} (the machine is shared: compare ratios within a round, read the spread)", flush=True)
    with tempfile.TemporaryDirectory(prefix="segcli-runtimes-") as tmp:
        for model in models:
            count = args.images or (DEMO_PHOTOS if model == "demo" else R50_PHOTOS)
            rounds, model_skip = args.rounds, set(skip)
            if args.quick:
                count, rounds = (3, 3) if model == "demo" else (2, 2)
                if model != "demo" and not cpu_has_fast_bf16():
                    # bf16 autocast without AMX or AVX-512 BF16 is emulated: R50 took ~2 min a photo here.
                    model_skip.add("tuned")
                    print("\n(--quick: the tuned row runs on the demo model only: this CPU has no AMX or AVX-512 BF16, "
                          "so bf16 autocast is emulated, minutes per R50 photo)")
            calibration = photos_all[count:count + CALIBRATION_PHOTOS]  # never timed
            bench_model(model, photos_all[:count], rounds, args.score_thr, Path(tmp), model_skip, calibration, args.profile)
    print(f"\nend:     {load_line()}")


if __name__ == "__main__":
    main()
