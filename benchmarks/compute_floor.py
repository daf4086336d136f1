"""The compute floor: the fewest seconds per image any runtime built on this machine's oneDNN
convolutions can take, which bounds what the CPU speed targets can reach.

    python benchmarks/compute_floor.py --weights shapes_demo [--images 6]

Two measurements, both on the photos and weights the benchmark uses:

  work   multiply-accumulates per image of every convolution and linear layer of segcli's
         prepared model (the fused CPU model `segcli predict` runs), counted by forward hooks during
         one pass over the photos, split by the precision each layer runs in (bf16 layers and the
         float32 output layers)
  rate   the fastest oneDNN ran a convolution of the model's own shapes on this machine, per
         precision: best of 5 calls of each of three shapes (3x3 256->256 on the two largest FPN
         levels, 1x1 1024->256), on the threads predict uses

floor = bf16 work / bf16 rate + float32 work / float32 rate. It is a measured bound, not the
silicon's: a faster kernel than oneDNN's would lower it. But OpenVINO runs the same oneDNN brgconv
kernels (`cpu_runtimes.py` prints them), so its time over the floor is the most any change to
segcli's code outside the kernels can gain against it, and plain's time over the floor is the most
any runtime can gain against plain without doing fewer multiply-accumulates (int8 does them at
twice the rate with VNNI; Winograd 3x3 convolutions would do fewer).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segcli.data.decode import Decoded  # noqa: E402
from segcli.data.images import read_image  # noqa: E402
from segcli.model.cpu_fusion import FusedConv2d, FusedLinear, FusedRPNHead  # noqa: E402
from segcli.predict.core import Predictor  # noqa: E402

# (output channels, input channels, kernel, height, width): the FPN's 3x3 output convolution on its
# two largest levels of a 640x480 photo (800x1088 network input), and a layer3-to-FPN 1x1.
RATE_SHAPES = ((256, 256, 3, 200, 272), (256, 256, 3, 100, 136), (256, 1024, 1, 50, 68))


@dataclass
class Floor:
    macs: dict[str, float]  # precision -> multiply-accumulates per image
    rates: dict[str, tuple[float, str]]  # precision -> (MAC/s, the shape that reached it)

    @property
    def seconds(self) -> float:
        return sum(macs / self.rates[precision][0] for precision, macs in self.macs.items() if macs)

    def describe(self) -> str:
        work = ", ".join(f"{p} {m / 1e9:.1f}" for p, m in self.macs.items() if m)
        rates = ", ".join(f"{p} {r / 1e9:.0f} GMAC/s ({shape})" for p, (r, shape) in self.rates.items() if self.macs.get(p))
        return (f"{sum(self.macs.values()) / 1e9:.1f} GMAC/img ({work}); oneDNN's best here: {rates} "
                f"-> {self.seconds:.3f} s/img, {1 / self.seconds:.2f} img/s at most")


def _precision(weight: torch.Tensor) -> str:
    return "bf16" if weight.dtype == torch.bfloat16 else "fp32"


def _layer_macs(module: nn.Module, inputs: tuple, output) -> int:
    """Multiply-accumulates of one call of a convolution or linear layer."""
    weight = module.weight
    if isinstance(module, nn.ConvTranspose2d):  # weight [in, out / groups, kh, kw], per input pixel
        return inputs[0].numel() * weight[0].numel()
    if isinstance(module, FusedRPNHead):  # its objectness + deltas matrix product [C, A + 4A]
        return sum(o.numel() for o in output[0] + output[1]) * weight.shape[0]
    return output.numel() * weight[0].numel()  # conv [out, in / groups, kh, kw] or linear [out, in]


def model_macs(predictor: Predictor, decoded: list[Decoded]) -> dict[str, float]:
    """Multiply-accumulates per image, by precision, of one pass of `predictor` over `decoded`."""
    totals = {"bf16": 0.0, "fp32": 0.0}
    counted = (FusedConv2d, FusedLinear, FusedRPNHead, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)

    def count(module, inputs, output) -> None:
        totals[_precision(module.weight)] += _layer_macs(module, inputs, output)

    hooks = [m.register_forward_hook(count) for m in predictor.model.modules() if isinstance(m, counted)]
    try:
        with torch.inference_mode():
            for image in decoded:
                predictor.predict([image])
    finally:
        for hook in hooks:
            hook.remove()
    return {precision: macs / len(decoded) for precision, macs in totals.items()}


def best_rate(dtype: torch.dtype, repeats: int = 5) -> tuple[float, str]:
    """The most multiply-accumulates per second oneDNN's fused convolution reached on RATE_SHAPES."""
    best = (0.0, "")
    with torch.inference_mode():
        for out_ch, in_ch, kernel, height, width in RATE_SHAPES:
            weight = torch.randn(out_ch, in_ch, kernel, kernel).to(dtype).contiguous(memory_format=torch.channels_last)
            x = torch.randn(1, in_ch, height, width).to(dtype).contiguous(memory_format=torch.channels_last)
            pad = kernel // 2

            def call() -> None:
                torch.ops.mkldnn._convolution_pointwise(x, weight, None, [pad, pad], [1, 1], [1, 1], 1, "none", [], "")

            call()
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - start)
            rate = out_ch * in_ch * kernel * kernel * height * width / min(seconds)
            best = max(best, (rate, f"{kernel}x{kernel} {in_ch}->{out_ch} at {height}x{width}"))
    return best


def compute_floor(weights: str, photos: list[Path], score_thr: float = 0.5) -> Floor:
    """The floor for `segcli predict --score-thr score_thr`: the threshold sets how many
    detections the mask head runs on."""
    predictor = Predictor.load(weights, None, "cpu", "auto", score_thr, 100, progress=False)
    decoded = [Decoded(None, index, read_image(path), None) for index, path in enumerate(photos)]
    macs = model_macs(predictor, decoded)
    rates = {p: best_rate(torch.bfloat16 if p == "bf16" else torch.float32) for p, m in macs.items() if m}
    return Floor(macs, rates)


def main() -> None:
    from benchmarks.common import COCO_TINY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="shapes_demo", help="a checkpoint or built-in name (default shapes_demo)")
    parser.add_argument("--images", type=int, default=6, help="coco_tiny photos to count the work on (default 6)")
    args = parser.parse_args()
    photos = sorted(COCO_TINY.glob("val2017/*.jpg"))[:args.images]
    if not photos:
        raise SystemExit(f"no photos under {COCO_TINY}; ../shared/data must be beside the project")
    print(f"threads {torch.get_num_threads()}; {len(photos)} photos; {args.weights}")
    print("compute floor: " + compute_floor(args.weights, photos).describe())


if __name__ == "__main__":
    main()
