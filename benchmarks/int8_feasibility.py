"""Can post-training int8 (backbone + FPN) make segcli faster on this CPU without losing mask AP?

    python benchmarks/int8_feasibility.py [--eval-images 60] [--calib-images 16] [--paths pt2e,ort]

Two routes, each calibrated on shapes images of a seed the evaluation set does not use, each timed
against its own fp32 on the same photos in the same process, and scored as COCO mask/box AP against
ground truth on a fresh synthetic shapes set with the shipped demo model (as
benchmarks/precision_accuracy.py scores bf16):

  pt2e   torch.export of the backbone+FPN, torchao's PT2E prepare/convert with X86InductorQuantizer
         (static, per-channel weights), run by torch.compile (inductor, freezing); compared with the
         same backbone compiled in fp32 and with eager fp32. Whole model otherwise unchanged.
  ort    `segcli export --format onnx`, then onnxruntime.quantization.quantize_static (QDQ, per-channel
         int8 weights, uint8 activations, MinMax calibration) of the Conv nodes under /backbone/;
         run by segcli predict like any ONNX export; compared with the fp32 export.

Timed: `segcli predict`-equivalent model calls on uint8 images (no decode or encoding), one image per
call, after one warm-up; printed as images/s, with every round's ratio, median and spread (the
machine is shared).
"""

from __future__ import annotations

import argparse
import inspect
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cli_throughput import load_line  # noqa: E402
from benchmarks.common import real_photos  # noqa: E402
from benchmarks.cpu_runtimes import cpu_line, kernels_line  # noqa: E402
from benchmarks.precision_accuracy import shapes_set  # noqa: E402
from segcli.data.images import read_image  # noqa: E402
from segcli.evaluate.run import evaluate_files  # noqa: E402
from segcli.export.run import ExportOptions, run_export  # noqa: E402
from segcli.export.verify import collate  # noqa: E402
from segcli.predict import core  # noqa: E402
from segcli.predict.options import PredictOptions  # noqa: E402
from segcli.predict.run import run_predict  # noqa: E402

WEIGHTS = "shapes_demo"
EVAL_SEED, CALIB_SEED = 20261202, 777


def predictor(weights: str = WEIGHTS):
    return core.Predictor.load(weights, None, "cpu", "fp32", 0.05, 100, progress=False)


def score(weights: str, gt: Path, images: Path, tmp: Path, tag: str, swap=None) -> dict:
    """segcli predict (score > 0.05, 100 per image) on the set, scored by segcli eval's code; `swap`
    replaces the loaded model's backbone (the PT2E route) while predict loads the checkpoint."""
    import json

    out = tmp / f"pred-{tag}.json"
    files = [str(images / i["file_name"]) for i in json.loads(gt.read_text())["images"]]
    original = core.Predictor.load
    if swap is not None:
        def load(*args, **kwargs):
            loaded = original(*args, **kwargs)
            loaded.model.backbone = swap
            return loaded

        core.Predictor.load = load
    try:
        run_predict(PredictOptions(sources=files, out=str(out), weights=weights, device="cpu", precision="fp32",
                                   score_thr=0.05, max_det=100, quiet=True, progress=False), stderr=io.StringIO())
    finally:
        core.Predictor.load = original
    report = evaluate_files(gt, out)
    return {"mask AP": report["segm"]["AP"], "box AP": report["bbox"]["AP"]}


def timed_rounds(runs: dict, inputs: list, rounds: int) -> dict:
    """{name: [images/s per round]}, rows taking turns within each round."""
    rates = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run(*inputs[0])
        for index in range(rounds):
            names = list(runs)[index % len(runs):] + list(runs)[:index % len(runs)]
            for name in names:
                start = time.perf_counter()
                for batch, sizes in inputs:
                    runs[name](batch, sizes)
                rates[name].append(len(inputs) / (time.perf_counter() - start))
    return rates


def print_rates(title: str, rates: dict, base: str) -> None:
    print(f"\n{title} ({load_line()})")
    print(f"  {'row':<16} {'img/s':>7} {'x ' + base:>12} {'spread':>11}  rounds")
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, rates[base])]
        print(f"  {name:<16} {statistics.median(values):7.2f} {statistics.median(ratios):11.2f}x "
              f"{min(ratios):5.2f}..{max(ratios):<5.2f}  " + " ".join(f"{r:.2f}x" for r in ratios), flush=True)


# -- route (a): PT2E + inductor ----------------------------------------------------------------------
def pt2e_backbones(backbone, calibration: list[torch.Tensor], log):
    """(fp32 compiled, int8 compiled) copies of `backbone` (float [1,3,H,W] in, dict of features out)."""
    import copy

    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    inductor_config.freezing = True  # weights as constants: int8 weight prepacking and folding
    example = (calibration[0],)
    name = next(iter(inspect.signature(backbone.forward).parameters))
    dims = {name: {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    log("torch.export of the backbone ...")
    exported = torch.export.export(copy.deepcopy(backbone).eval(), example, dynamic_shapes=dims).module()
    split_call_sites(exported)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    log(f"calibrating on {len(calibration)} images ...")
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    quantized = convert_pt2e(prepared)
    log("torch.compile (int8, fp32) ...")
    return torch.compile(copy.deepcopy(backbone).eval(), dynamic=True), torch.compile(quantized, dynamic=True)


class Swapped(torch.nn.Module):
    """A backbone replacement MaskRCNN accepts: it reads `backbone.body.conv1.weight` for the memory format."""

    def __init__(self, run, body) -> None:
        super().__init__()
        self.run, self.body = run, body

    def forward(self, x):
        return self.run(x)


def split_call_sites(graph_module) -> None:
    """One source partition per ReLU call: torchvision's BasicBlock/Bottleneck call one `self.relu`
    two or three times, and X86InductorQuantizer's conv-add-relu matcher raises "Input partition has
    more than one output node" on a module with several call sites (pytorch/ao#4478). Partitions
    are keyed by the innermost module path in each node's nn_module_stack (non-strict export), so a
    per-node path splits them."""
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (path, cls) = list(stack.items())[-1]
        if "ReLU" in str(cls):
            stack[key] = (f"{path}__{node.name}", cls)


def backbone_inputs(model, images: list[np.ndarray]) -> list[torch.Tensor]:
    """What the model feeds its backbone: normalized, resized, padded float input."""
    captured = []
    original = model.backbone

    class Tap(torch.nn.Module):
        def forward(self, x):
            captured.append(x.clone())
            return original(x)

    model.backbone = Swapped(Tap(), original.body)
    try:
        with torch.inference_mode():
            for image in images:
                model(*collate([image]))
    finally:
        model.backbone = original
    # Out of inference mode: torch.export and the observers need ordinary tensors.
    return [t.clone() for t in captured]


def unfused_backbone():
    """The demo model's backbone+FPN in fp32, BatchNorm folded, standard modules only (predict's
    fused oneDNN layers are custom ops that torch.export does not trace through)."""
    from segcli.device import prepare_for_inference
    from segcli.model.build import model_from_checkpoint
    from segcli.model.roi_heads import DetectionSettings
    from segcli.weights import resolve_weights

    model = model_from_checkpoint(resolve_weights(WEIGHTS), DetectionSettings(score_threshold=0.05))
    return prepare_for_inference(model, torch.device("cpu"), "fp32", fuse=False).backbone


def route_pt2e(args, eval_set, calib_images, photos, tmp, log) -> dict:
    model = predictor().model  # what predict runs: fp32, fused oneDNN layers on this CPU
    calibration = backbone_inputs(model, calib_images)
    fp32_compiled, int8_compiled = pt2e_backbones(unfused_backbone(), calibration, log)
    eager = model.backbone
    fp32_compiled, int8_compiled = Swapped(fp32_compiled, eager.body), Swapped(int8_compiled, eager.body)

    def with_backbone(backbone):
        def run(batch, sizes):
            model.backbone = backbone
            try:
                return model(batch, sizes)
            finally:
                model.backbone = eager
        return run

    inputs = [collate([read_image(p)]) for p in photos]
    log("timing (first calls compile) ...")
    rates = timed_rounds({"segcli fp32": with_backbone(eager), "compiled fp32": with_backbone(fp32_compiled),
                          "pt2e int8": with_backbone(int8_compiled)}, inputs, args.rounds)
    print_rates(f"pt2e: demo model, whole model on {len(photos)} photos", rates, "segcli fp32")
    features = [backbone_inputs(model, [read_image(p)])[0] for p in photos[:2]]
    backbone_rates = timed_rounds({"segcli fp32": lambda x, _: eager(x), "compiled fp32": lambda x, _: fp32_compiled(x),
                                   "pt2e int8": lambda x, _: int8_compiled(x)}, [(f, None) for f in features], args.rounds)
    print_rates("pt2e: backbone+FPN alone", backbone_rates, "segcli fp32")
    log("scoring ...")
    return {"pt2e int8": score(WEIGHTS, *eval_set, tmp, "pt2e", swap=int8_compiled)}


# -- route (b): ONNX Runtime quantize_static ---------------------------------------------------------
REDUCE_RANGE = False  # --reduce-range: 7-bit weights, against u8s8 saturation on CPUs without VNNI


def quantize_onnx(weights: str, tag: str, calib_images: list[np.ndarray], tmp: Path, log) -> tuple[Path, Path]:
    """(fp32 export, int8 copy): quantize_static QDQ, per-channel s8 weights, u8 activations, MinMax,
    the Conv nodes under /backbone/ (ResNet body and FPN) only; the export's metadata kept."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from segcli.export.metadata import KEY

    fp32_path, int8_path = tmp / f"{tag}.onnx", tmp / f"{tag}-int8.onnx"
    log(f"segcli export --format onnx ({tag}) ...")
    run_export(ExportOptions(weights=weights, format="onnx", out=str(fp32_path), verify=False))
    graph = onnx.load(str(fp32_path))
    # ORT's pre-processing (its graph optimizer, constant folding): the R50 export computes its
    # folded-BatchNorm biases with nodes, and quantize_static leaves a Conv whose bias is no
    # initializer as DequantizeLinear -> fp32 Conv (6 of 61 fused into QLinearConv, slower than fp32).
    source = fp32_path
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source = tmp / f"{tag}-pre.onnx"
        quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
    except Exception as error:  # a finding, not a stop: quantize the export as written
        print(f"  quant_pre_process failed ({type(error).__name__}: {' '.join(str(error).split())[:200]}); quantizing the export as is")
        source = fp32_path
    convs = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "Conv" and n.name.startswith("/backbone/")]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"images": im[None], "sizes": np.array([im.shape[:2]], np.int64)} for im in calib_images])

        def get_next(self):
            return next(self.items, None)

    log(f"quantize_static: {len(convs)} Conv nodes of the backbone+FPN, calibrating on {len(calib_images)} images ...")
    started = time.perf_counter()
    quantize_static(str(source), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
                    nodes_to_quantize=convs, reduce_range=REDUCE_RANGE,
                    extra_options={"ActivationSymmetric": False})
    quantized = onnx.load(str(int8_path))
    if not any(p.key == KEY for p in quantized.metadata_props):  # predict needs the export's metadata
        entry = quantized.metadata_props.add()
        entry.key, entry.value = KEY, next(p.value for p in graph.metadata_props if p.key == KEY)
        onnx.save(quantized, str(int8_path))
    print(f"\nort {tag}: {len(convs)} Conv nodes quantized in {time.perf_counter() - started:.0f} s; "
          f"{fp32_path.stat().st_size / 1e6:.1f} MB -> {int8_path.stat().st_size / 1e6:.1f} MB; {ort_kernels(int8_path, tmp)}")
    return fp32_path, int8_path


def ort_kernels(path: Path, tmp: Path) -> str:
    """Which convolution kernels ONNX Runtime's optimized graph holds (QDQ pairs fused into QLinearConv?)."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp / f"{path.stem}-optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    names = ("QLinearConv", "Conv", "FusedConv", "NchwcConv", "QuantizeLinear", "DequantizeLinear")
    return "optimized graph: " + ", ".join(f"{n} x{counts[n]}" for n in names if counts[n])


def route_ort(args, eval_set, calib_images, photos, tmp, log) -> dict:
    from segcli.export.runtime import load_exported

    fp32_path, int8_path = quantize_onnx(WEIGHTS, "demo", calib_images, tmp, log)
    threads = torch.get_num_threads()
    inputs = [collate([read_image(p)]) for p in photos]
    rates = timed_rounds({"ort fp32": load_exported(str(fp32_path), threads=threads)[0],
                          "ort int8": load_exported(str(int8_path), threads=threads)[0]}, inputs, args.rounds)
    print_rates(f"ort: demo model, whole exported graph on {len(photos)} photos", rates, "ort fp32")
    if args.r50:
        route_ort_r50(args, photos, tmp, log)
    log("scoring ...")
    return {"ort fp32": score(str(fp32_path), *eval_set, tmp, "ort-fp32"),
            "ort int8": score(str(int8_path), *eval_set, tmp, "ort-int8")}


def route_ort_r50(args, photos, tmp, log) -> None:
    """R50-FPN v1 (seeded, ~10 detections per image): speed, and int8's agreement with its fp32 export."""
    from benchmarks.common import seeded_state_dict
    from benchmarks.cpu_runtimes import segcli_loop
    from benchmarks.predict_throughput import mask_ap, match_fraction
    from segcli.categories import COCO_LABELS
    from segcli.export.runtime import load_exported
    from segcli.weights import save_checkpoint

    log("R50: seeded weights ...")
    checkpoint = tmp / "r50.pt"
    save_checkpoint(checkpoint, seeded_state_dict("maskrcnn_resnet50_fpn", real_photos(2)), "maskrcnn_resnet50_fpn",
                    [{"id": i, "name": n} for i, n in enumerate(COCO_LABELS) if i], list(range(len(COCO_LABELS))), {"seed": 0})
    calibration = [read_image(p) for p in real_photos(8 + len(photos))[len(photos):]]  # photos not timed
    fp32_path, int8_path = quantize_onnx(str(checkpoint), "r50", calibration, tmp, log)
    threads = torch.get_num_threads()
    inputs = [collate([read_image(p)]) for p in photos]
    rates = timed_rounds({"ort fp32": load_exported(str(fp32_path), threads=threads)[0],
                          "ort int8": load_exported(str(int8_path), threads=threads)[0]}, inputs, args.rounds)
    print_rates(f"ort: R50-FPN v1 (seeded), whole exported graph on {len(photos)} photos", rates, "ort fp32")
    _, reference = segcli_loop(fp32_path, photos, 0.5, tmp / "r50-fp32.json")
    _, candidate = segcli_loop(int8_path, photos, 0.5, tmp / "r50-int8.json")
    fraction, total = match_fraction(reference, candidate)
    print(f"  R50 int8 vs its fp32 export at score > 0.5: {fraction:.0%} of {total} detections within the parity "
          f"contract; mask AP with fp32's detections as truth {mask_ap(reference, candidate):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default="pt2e,ort")
    parser.add_argument("--eval-images", type=int, default=60)
    parser.add_argument("--calib-images", type=int, default=16)
    parser.add_argument("--photos", type=int, default=3, help="coco_tiny photos timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--r50", action="store_true", help="ort: also R50-FPN v1 (seeded) speed and int8/fp32 agreement")
    parser.add_argument("--reduce-range", action="store_true",
                        help="ort: 7-bit weights (AVX2 without VNNI multiplies u8 x s8 into saturating int16 pairs)")
    parser.add_argument("--work", type=Path, default=None, help="keep the shapes sets here")
    args = parser.parse_args()
    global REDUCE_RANGE
    REDUCE_RANGE = args.reduce_range
    log = lambda message: print(f"  [int8] {message}", file=sys.stderr, flush=True)  # noqa: E731
    print("command: " + " ".join(["python", *sys.argv]))
    print("cpu:     " + cpu_line())
    print("kernels: " + kernels_line())
    print(f"start:   {load_line()} (shared machine: read the spreads)", flush=True)
    with tempfile.TemporaryDirectory(prefix="segcli-int8-") as tmp_name:
        tmp = Path(tmp_name)
        work = args.work or tmp
        work.mkdir(parents=True, exist_ok=True)
        eval_set = shapes_set(work, args.eval_images, EVAL_SEED)
        calib_folder = shapes_set(work, args.calib_images, CALIB_SEED)[1]
        calib_images = [read_image(p) for p in sorted(calib_folder.glob("*"))[:args.calib_images]]
        photos = real_photos(args.photos)
        scores = {"eager fp32": score(WEIGHTS, *eval_set, tmp, "fp32")}
        for path in args.paths.split(","):
            try:
                scores |= {"pt2e": route_pt2e, "ort": route_ort}[path](args, eval_set, calib_images, photos, tmp, log)
            except Exception as error:  # a route that cannot run on this machine is a finding, not a crash
                print(f"\n{path}: FAILED: {type(error).__name__}: {' '.join(str(error).split())[:500]}", flush=True)
        base = scores["eager fp32"]["mask AP"]
        print(f"\naccuracy: demo model on {args.eval_images} fresh shapes images (seed {EVAL_SEED}), score > 0.05")
        print(f"  {'row':<12} {'mask AP':>8} {'box AP':>8} {'mask AP - fp32':>15}")
        for name, value in scores.items():
            print(f"  {name:<12} {value['mask AP']:8.4f} {value['box AP']:8.4f} {(value['mask AP'] - base) * 100:+14.2f}pt")
    print(f"\nend:     {load_line()}")


if __name__ == "__main__":
    main()
