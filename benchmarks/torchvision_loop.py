"""The reference a user would write: torchvision's Mask R-CNN over a list of photos, as a script.

    python benchmarks/torchvision_loop.py --arch maskrcnn_resnet50_fpn --state weights.pt \
        --out results.json [--tuned] [--score-thr 0.5] IMAGE...

One image at a time: PIL decode, the model, keep scores above the threshold, masks > 0.5,
pycocotools encode per mask, and the COCO results list written at the end (json). `--tuned` adds
what torchvision's docs suggest for CPU speed: bf16 autocast and channels_last (AMP fp16 on CUDA).
`--state` is a plain torchvision state dict (torch.load, weights_only). benchmarks/
predict_throughput.py runs it as a subprocess, beside `segcli predict`, to time both end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import torchvision_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--arch", required=True)
    parser.add_argument("--state", required=True, help="torchvision state dict (.pt)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--score-thr", type=float, default=0.5)
    parser.add_argument("--tuned", action="store_true", help="bf16 autocast + channels_last (AMP fp16 on CUDA)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = torchvision_model(args.arch)
    model.load_state_dict(torch.load(args.state, map_location="cpu", weights_only=True))
    model = model.to(device).eval()
    if args.tuned:
        model = model.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    results = []
    for image_id, path in enumerate(args.images, start=1):
        image = np.asarray(Image.open(path).convert("RGB"))
        tensor = torch.from_numpy(image.copy()).to(device).permute(2, 0, 1).float() / 255
        amp = torch.autocast(device.type, dtype=dtype) if args.tuned else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            out = model([tensor])[0]
        keep = out["scores"] > args.score_thr
        boxes = out["boxes"][keep].float().cpu().numpy()
        scores = out["scores"][keep].float().cpu().numpy()
        labels = out["labels"][keep].cpu().numpy()
        masks = (out["masks"][keep, 0] > 0.5).cpu().numpy()
        for box, score, label, mask in zip(boxes, scores, labels, masks):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append({"image_id": image_id, "category_id": int(label), "score": float(score),
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
