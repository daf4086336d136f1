"""Images/s of the eager model (fp32, bf16) against its TorchScript and ONNX Runtime exports.

    python benchmarks/export_throughput.py [--images 4] [--archs maskrcnn_resnet50_fpn,maskrcnn_resnet18_fpn_small]

One process, same real photos (../shared/data/coco_tiny, decoded beforehand), same seeded weights
(benchmarks.common.seeded_state_dict: the classifier scaled to a trained model's score spread), one
image per call, threshold 0.05 and 100 detections per image for every runner (the export's
defaults), after one warm-up image. Timed: uint8 image in, detections with 28x28 masks out (no
decoding, pasting or file writing, which are the same code for all four).

  eager fp32    segcli's MaskRCNN, BatchNorm folded, float32 (the reference)
  eager bf16    the same with bf16 autocast + channels_last (predict's default on AVX-512/AMX CPUs)
  torchscript   `segcli export --format torchscript`, run through segcli.export.runtime
  onnxruntime   `segcli export --format onnx`, ONNX Runtime's CPU provider

Ratios are against eager fp32. The exports are also checked against eager fp32 with the parity
contract (segcli.model.parity), so a fast but wrong export would show; bf16's count is for
information (it is not meant to reproduce fp32 detections one by one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import real_photos, seeded_state_dict  # noqa: E402
from segcli.categories import coco_categories, coco_label_to_category_id  # noqa: E402
from segcli.data.images import read_image  # noqa: E402
from segcli.device import prepare_for_inference  # noqa: E402
from segcli.export.run import ExportOptions, run_export  # noqa: E402
from segcli.export.runtime import load_exported  # noqa: E402
from segcli.export.verify import collate  # noqa: E402
from segcli.model.build import model_from_checkpoint  # noqa: E402
from segcli.model.parity import compare_detections  # noqa: E402
from segcli.model.roi_heads import CUDA_CANDIDATE_CAP, DetectionSettings  # noqa: E402
from segcli.weights import resolve_weights, save_checkpoint  # noqa: E402


def eager_model(checkpoint_path: Path, precision: str):
    ckpt = resolve_weights(str(checkpoint_path))
    model = model_from_checkpoint(ckpt, DetectionSettings(score_threshold=0.05, candidate_cap=CUDA_CANDIDATE_CAP))
    known = {c["id"] for c in ckpt.categories}
    model.roi_heads.restrict_labels([cid in known for cid in ckpt.label_to_category_id])
    return prepare_for_inference(model, torch.device("cpu"), precision)


def timed(run, inputs) -> tuple[float, list]:
    """Images/s over `inputs` after one warm-up call, and the outputs."""
    with torch.inference_mode():
        run(*inputs[0])
        outputs = []
        start = time.perf_counter()
        for batch, sizes in inputs:
            outputs.append(run(batch, sizes))
        seconds = time.perf_counter() - start
    return len(inputs) / seconds, outputs


def parity(reference: list, candidate: list) -> str:
    matched = total = 0
    for ref, cand in zip(reference, candidate):
        report = compare_detections(ref.boxes, ref.scores, ref.labels, ref.mask_probs > 0.5,
                                    cand.boxes, cand.scores, cand.labels, cand.mask_probs > 0.5)
        matched += report.matched
        total += max(report.reference_count, report.candidate_count)
    return f"{matched}/{total} match eager fp32"


def bench_arch(arch: str, photos: list[Path], folder: Path) -> None:
    started = time.perf_counter()
    state = seeded_state_dict(arch, real_photos(2))
    checkpoint = folder / f"{arch}.pt"
    save_checkpoint(checkpoint, state, arch, coco_categories(), coco_label_to_category_id(), {"seed": 0})
    inputs = [collate([read_image(p)]) for p in photos]
    rows = []
    reference = None
    for name, precision in (("eager fp32", "fp32"), ("eager bf16", "bf16")):
        rate, outputs = timed(eager_model(checkpoint, precision), inputs)
        reference = reference or outputs
        # bf16 changes features enough to move near-threshold detections; it is not held to fp32 parity
        # (predict_throughput.py scores bf16 against fp32 as mask AP instead). Shown for information.
        rows.append((name, rate, f"{parity(reference, outputs)} (bf16: information only)" if precision != "fp32" else "reference"))
    for fmt, suffix in (("torchscript", ".ts"), ("onnx", ".onnx")):
        out = folder / f"{arch}{suffix}"
        export_start = time.perf_counter()
        run_export(ExportOptions(weights=str(checkpoint), format=fmt, out=str(out), verify=False))
        export_seconds = time.perf_counter() - export_start
        model, _ = load_exported(str(out), threads=torch.get_num_threads())
        rate, outputs = timed(model, inputs)
        rows.append(("onnxruntime" if fmt == "onnx" else fmt, rate, f"{parity(reference, outputs)}; export {export_seconds:.0f} s"))
    base = rows[0][1]
    print(f"\n{arch}: {len(photos)} photos ({', '.join(f'{b.shape[1]}x{b.shape[2]}' for b, _ in inputs)}), "
          f"{torch.get_num_threads()} threads, setup+run {time.perf_counter() - started:.0f} s")
    print(f"  {'runner':<12} {'images/s':>9} {'vs fp32':>8}  check")
    for name, rate, note in rows:
        print(f"  {name:<12} {rate:9.3f} {rate / base:7.2f}x  {note}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="photos timed per runner (default 4)")
    parser.add_argument("--archs", default="maskrcnn_resnet50_fpn,maskrcnn_resnet18_fpn_small")
    args = parser.parse_args()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise SystemExit('onnxruntime is missing: pip install "segcli[onnx]"')
    photos = real_photos(args.images)
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, CPU threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="segcli-bench-") as folder:
        for arch in args.archs.split(","):
            bench_arch(arch.strip(), photos, Path(folder))


if __name__ == "__main__":
    main()
