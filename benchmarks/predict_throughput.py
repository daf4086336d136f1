"""Images/s of segcli predict against torchvision loops, on the same real photos and weights.

    python benchmarks/predict_throughput.py [--rounds 3] [--archs maskrcnn_resnet50_fpn,...]
    python benchmarks/predict_throughput.py --mode inprocess [--images 12] [--thresholds 0.5,0.05]

--mode cli (the default): each pipeline a process of its own, as a user runs it, timed over N and
2N photos so that start-up cancels, plus segcli's per-stage profile; see benchmarks/cli_throughput.py.

--mode inprocess: three pipelines, one process, same photos (../shared/data/coco_tiny), same weights:
  plain   PIL decode, torchvision's model one image at a time in fp32, threshold, pycocotools
          encode per mask (how torchvision's docs and reference scripts do it)
  tuned   the same with bf16 autocast + channels_last on the CPU, AMP (fp16) on CUDA
  segcli  `segcli predict` end to end (decode threads, batching, COCO file written), default precision
At --score-thr 0.5 and 0.05, for each architecture, on the CPU and on CUDA when present. Also:
segcli in fp32 against the plain loop (the parity contract: same label, box within 0.5 px, score
within 1e-3, mask IoU >= 0.98), and segcli's default (bf16) mode against its fp32 mode as COCO mask
AP with the fp32 detections as ground truth.

Weights are seeded random with the classifier scaled to a trained model's score spread (no
download here); pass --weights-dir with torchvision's real checkpoints to use those instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cli_throughput import run_cli_benchmark  # noqa: E402
from benchmarks.common import real_photos, seeded_state_dict, torchvision_model  # noqa: E402
from segcli.categories import COCO_LABELS  # noqa: E402
from segcli.predict.options import PredictOptions  # noqa: E402
from segcli.predict.run import run_predict
from segcli.model.parity import compare_detections  # noqa: E402
from segcli.weights import save_checkpoint  # noqa: E402


def torchvision_loop(model, photos, threshold, device, tuned):
    """Return (seconds, {file_name: (boxes, scores, labels, masks)})."""
    model = model.to(device).eval()
    if tuned:
        model = model.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    results = {}
    start = time.perf_counter()
    for path in photos:
        image = np.asarray(Image.open(path).convert("RGB"))
        tensor = torch.from_numpy(image).to(device).permute(2, 0, 1).float() / 255
        amp = torch.autocast(device.type, dtype=dtype) if tuned else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            out = model([tensor])[0]
        keep = out["scores"] > threshold
        boxes, scores, labels = out["boxes"][keep].float().cpu(), out["scores"][keep].float().cpu(), out["labels"][keep].cpu()
        masks = (out["masks"][keep, 0] > 0.5).cpu().numpy()
        rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
        results[path.name] = (boxes, scores, labels, torch.from_numpy(masks), rles)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, results


def segcli_run(checkpoint, photos, threshold, device, precision, batch_size, out_dir):
    """Run segcli predict end to end; return (seconds, {file_name: (boxes, scores, labels, masks)})."""
    out = Path(out_dir) / f"segcli-{precision}-{threshold}.json"
    options = PredictOptions(sources=[str(p) for p in photos], out=str(out), weights=str(checkpoint), device=str(device),
                             precision=precision, batch_size=batch_size, score_thr=threshold, quiet=True, progress=False)
    # The prediction loop's own clock: decoding, inference, encoding and writing, but not loading
    # the weights, just as the torchvision loops are timed with their model already built.
    summary = run_predict(options, stderr=io.StringIO())
    return summary.seconds, read_coco_predictions(out)


def read_coco_predictions(path):
    data = json.loads(Path(path).read_text())
    by_image = {image["id"]: (Path(image["file_name"]).name, []) for image in data["images"]}
    for ann in data["annotations"]:
        by_image[ann["image_id"]][1].append(ann)
    results = {}
    for name, anns in by_image.values():
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]).reshape(-1, 4)
        masks = mask_utils.decode([a["segmentation"] for a in anns]) if anns else np.zeros((1, 1, 0), np.uint8)
        results[name] = (boxes, torch.tensor([a["score"] for a in anns]), torch.tensor([a["category_id"] for a in anns]),
                         torch.from_numpy(masks.transpose(2, 0, 1).astype(bool)), [a["segmentation"] for a in anns])
    return results


def match_fraction(reference, candidate):
    matched = total = 0
    for name, (boxes, scores, labels, masks, _) in reference.items():
        c = candidate[name]
        report = compare_detections(boxes, scores, labels, masks, c[0], c[1], c[2], c[3])
        matched += report.matched
        total += max(report.reference_count, report.candidate_count)
    return matched / total if total else 1.0, total


def mask_ap(ground_truth, predictions):
    """COCO mask AP of `predictions` scored with `ground_truth` detections as the truth.

    Empty masks (no pixel above 0.5, common with seeded random weights) are left out on both
    sides: an empty mask's IoU with anything is 0, so a set scored against itself would read
    below 1 (0.951 on seeded R50 did)."""
    images, anns, results = [], [], []
    for image_id, (name, (_, _, labels, masks, rles)) in enumerate(ground_truth.items(), start=1):
        height, width = (masks.shape[1], masks.shape[2]) if masks.shape[0] else (1, 1)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for k, rle in enumerate(rles):
            area = float(mask_utils.area(rle))
            if area:
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(labels[k]), "segmentation": rle,
                             "area": area, "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
        p = predictions[name]
        for k, rle in enumerate(p[4]):
            if mask_utils.area(rle):
                results.append({"image_id": image_id, "category_id": int(p[2][k]), "segmentation": rle, "score": float(p[1][k])})
    if not anns or not results:
        return float("nan")
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": i} for i in range(1, 91)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "segm")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    return float(evaluator.stats[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("cli", "inprocess"), default="cli")
    parser.add_argument("--images", type=int, default=None, help="photos: N of the cli mode (6), inprocess: 12")
    parser.add_argument("--archs", default=None,
                        help="cli: maskrcnn_resnet50_fpn,maskrcnn_resnet50_fpn_v2,maskrcnn_resnet18_fpn_small; "
                             "inprocess: maskrcnn_resnet50_fpn,maskrcnn_resnet18_fpn_small")
    parser.add_argument("--rounds", type=int, default=3, help="cli: rounds in which the pipelines take turns")
    parser.add_argument("--segcli-precisions", default="auto,fp32", help="cli: segcli runs, one per --precision")
    parser.add_argument("--no-profile", action="store_true", help="cli: skip the per-stage profile")
    parser.add_argument("--baseline", type=Path, default=None, help="cli: also time segcli from this checkout (e.g. main)")
    parser.add_argument("--thresholds", default="0.5,0.05")
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu-batch-size", type=int, default=8)
    parser.add_argument("--skip-parity", action="store_true", help="skip the fp32 match and bf16 agreement runs")
    args = parser.parse_args()
    if args.mode == "cli":
        archs = args.archs or "maskrcnn_resnet50_fpn,maskrcnn_resnet50_fpn_v2,maskrcnn_resnet18_fpn_small"
        run_cli_benchmark(archs.split(","), args.images or 6, args.rounds, args.segcli_precisions.split(","),
                          profile=not args.no_profile, baseline=args.baseline)
        return
    args.archs = args.archs or "maskrcnn_resnet50_fpn,maskrcnn_resnet18_fpn_small"
    photos = real_photos(args.images or 12)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for device_name in args.devices.split(","):
            device = torch.device(device_name)
            for arch in args.archs.split(","):
                state = seeded_state_dict(arch, photos)
                checkpoint = Path(tmp) / f"{arch}.pt"
                # Every label is a category here, as in torchvision's raw output, so both report the same set.
                categories = [{"id": i, "name": name} for i, name in enumerate(COCO_LABELS) if i]
                save_checkpoint(checkpoint, state, arch, categories, list(range(len(COCO_LABELS))), {"seed": 0})
                reference = torchvision_model(arch)
                reference.load_state_dict(state)
                batch = 1 if device.type == "cpu" else args.gpu_batch_size
                # Warm-up (oneDNN / cuDNN kernel selection) so no pipeline pays it in its timing.
                torchvision_loop(reference, photos[:1], 0.5, device, tuned=True)
                segcli_run(checkpoint, photos[:1], 0.5, device, "auto", batch, tmp)
                for threshold in (float(t) for t in args.thresholds.split(",")):
                    plain_s, plain = torchvision_loop(reference, photos, threshold, device, tuned=False)
                    tuned_s, _ = torchvision_loop(reference, photos, threshold, device, tuned=True)
                    reference.to(memory_format=torch.contiguous_format)
                    segcli_s, segcli = segcli_run(checkpoint, photos, threshold, device, "auto", batch, tmp)
                    row = {"device": device_name, "arch": arch, "thr": threshold, "n": len(photos),
                           "dets": sum(len(v[1]) for v in segcli.values()) / len(photos),
                           "plain": len(photos) / plain_s, "tuned": len(photos) / tuned_s, "segcli": len(photos) / segcli_s}
                    if not args.skip_parity:
                        _, fp32 = segcli_run(checkpoint, photos, threshold, device, "fp32", batch, tmp)
                        row["fp32_match"], row["compared"] = match_fraction(plain, fp32)
                        row["bf16_ap"] = mask_ap(fp32, segcli)
                    rows.append(row)
                    print_row(row, header=len(rows) == 1)
    print(f"\nmachine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))


def print_row(row, header):
    if header:
        print(f"{'device':6} {'arch':28} {'thr':>5} {'imgs':>4} {'dets/img':>8} {'plain':>7} {'tuned':>7} {'segcli':>7} "
              f"{'x plain':>7} {'x tuned':>7} {'fp32 match':>10} {'bf16 mask AP':>12}")
    extra = ""
    if "fp32_match" in row:
        extra = f" {row['fp32_match']:>10.1%} {row['bf16_ap']:>12.3f}"
    print(f"{row['device']:6} {row['arch']:28} {row['thr']:>5} {row['n']:>4} {row['dets']:>8.1f} {row['plain']:>7.2f} "
          f"{row['tuned']:>7.2f} {row['segcli']:>7.2f} {row['segcli'] / row['plain']:>7.2f} {row['segcli'] / row['tuned']:>7.2f}{extra}",
          flush=True)


if __name__ == "__main__":
    main()
