"""Correctness checks of the Triton kernels against torchvision.

Used two ways by ``tests/test_triton_kernels.py``:

* as a script, in a subprocess with ``TRITON_INTERPRET=1`` (which must be set
  before triton is imported), running the kernels on CPU tensors through the
  Triton interpreter::

      TRITON_INTERPRET=1 python tests/triton_interpreter_check.py nms_random roi_align_fp32

  prints one JSON line per check and exits non-zero on the first failure;
* imported, with ``device="cuda"``, to run the same checks on a real GPU.

Every ``check_*`` function raises AssertionError on a mismatch and returns a
small dict of statistics.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torchvision

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from segcli.ops import nms_triton, roi_align_triton  # noqa: E402


# --------------------------------------------------------------------------- NMS
def _reference_keep(boxes: torch.Tensor, valid: torch.Tensor, labels: Optional[torch.Tensor], thr: float) -> torch.Tensor:
    """torchvision greedy NMS on each group's valid entries, mapped back to [G, K].

    Per-label ``torchvision.ops.nms`` (what ``batched_nms`` does for large
    inputs; its small-input "coordinate trick" shifts boxes and so is not
    bit-exact at IoU ties).  Scores are strictly decreasing along K.
    """
    boxes, valid = boxes.cpu(), valid.cpu()
    labels = labels.cpu() if labels is not None else None
    G, K = valid.shape
    scores = torch.arange(K, 0, -1, dtype=torch.float32)
    keep = torch.zeros(G, K, dtype=torch.bool)
    for g in range(G):
        idx = torch.nonzero(valid[g]).flatten()
        if idx.numel() == 0:
            continue
        if labels is None:
            kept = idx[torchvision.ops.nms(boxes[g, idx], scores[idx], thr)]
            keep[g, kept] = True
        else:
            for lab in labels[g, idx].unique():
                sub = idx[labels[g, idx] == lab]
                keep[g, sub[torchvision.ops.nms(boxes[g, sub], scores[sub], thr)]] = True
    return keep


def _count_chain_effects(boxes, valid, labels, thr) -> int:
    """Entries kept by greedy NMS that overlap (> thr) an earlier valid entry."""
    keep = _reference_keep(boxes, valid, labels, thr)
    boxes, valid = boxes.cpu(), valid.cpu()
    n = 0
    for g in range(valid.shape[0]):
        iou = torchvision.ops.box_iou(boxes[g], boxes[g])
        pair = (iou > thr) & valid[g][:, None] & valid[g][None, :]
        pair = pair.triu(diagonal=1)  # i < j
        if labels is not None:
            pair &= labels[g].cpu()[:, None] == labels[g].cpu()[None, :]
        n += int((keep[g] & pair.any(dim=0)).sum())
    return n


def _random_groups(G: int, K: int, seed: int, device: str):
    """Clustered boxes (suppression chains), random scores sorted per group,
    3 labels, random validity; group 1 has no valid entry."""
    gen = torch.Generator().manual_seed(seed)
    n_clusters = max(1, K // 12)
    centers = torch.rand(G, n_clusters, 2, generator=gen) * 200
    which = torch.randint(0, n_clusters, (G, K), generator=gen)
    ctr = torch.gather(centers, 1, which[..., None].expand(G, K, 2))
    ctr = ctr + torch.randn(G, K, 2, generator=gen) * 4
    size = 10 + torch.rand(G, K, 2, generator=gen) * 30
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], dim=-1)
    # a few exact duplicates (IoU exactly 1) and degenerate boxes
    dup = torch.rand(G, K, generator=gen) < 0.05
    boxes[:, 1:][dup[:, 1:]] = boxes[:, :-1][dup[:, 1:]]
    boxes[:, ::17, 2] = boxes[:, ::17, 0]
    scores = torch.rand(G, K, generator=gen)
    order = scores.argsort(dim=1, descending=True)
    boxes = torch.gather(boxes, 1, order[..., None].expand(G, K, 4))
    labels = torch.randint(0, 3, (G, K), generator=gen)
    valid = torch.rand(G, K, generator=gen) < 0.75
    if G > 1:
        valid[1] = False
    return boxes.to(device), valid.to(device), labels.to(device)


def _compare_keep(boxes, valid, labels, thr) -> Dict[str, int]:
    got = nms_triton.nms_padded(boxes, valid, labels, thr)
    assert got.dtype == torch.bool and tuple(got.shape) == tuple(valid.shape), (got.dtype, got.shape)
    ref = _reference_keep(boxes, valid, labels, thr)
    got = got.cpu()
    bad = (got != ref).nonzero().tolist()
    assert not bad, f"keep differs from torchvision at (group, index) {bad[:10]} (thr={thr}, labels={labels is not None})"
    return {"kept": int(ref.sum()), "valid": int(valid.sum()), "suppressed": int(valid.sum() - ref.sum())}


def check_nms_random(device: str = "cpu") -> Dict:
    """Random clustered groups; K = 300 (one block) and K = 37; thresholds
    0.5 / 0.7; labels given and None; one group without valid entries."""
    stats: List[Dict] = []
    chains = 0
    for K, G in ((300, 2), (37, 4)):
        boxes, valid, labels = _random_groups(G, K, seed=K, device=device)
        for thr in (0.5, 0.7):
            for lab in (labels, None):
                s = _compare_keep(boxes, valid, lab, thr)
                stats.append(s)
                chains += _count_chain_effects(boxes, valid, lab, thr)
    # the data must exercise the greedy order: some entries are kept only
    # because the entry overlapping them was itself suppressed
    assert chains > 0
    return {"cases": len(stats), "total_suppressed": sum(s["suppressed"] for s in stats), "chain_effects": chains}


def check_nms_multiblock(device: str = "cpu") -> Dict:
    """Force a 64-wide block so that K = 300 (not a multiple) spans 5 blocks,
    exercising the blocked inner loop the kernel uses for K > 1024."""
    saved = nms_triton._MAX_BLOCK
    nms_triton._MAX_BLOCK = 64
    try:
        assert nms_triton._launch_config(300)[0] == 64
        boxes, valid, labels = _random_groups(2, 300, seed=7, device=device)
        out = [_compare_keep(boxes, valid, labels, 0.5), _compare_keep(boxes, valid, None, 0.7)]
        # tiny groups: K = 1 (specialised to a constant by Triton) and K = 2
        for K in (1, 2):
            b, v, l = _random_groups(2, K, seed=K, device=device)
            v[0] = True
            out.append(_compare_keep(b, v, l, 0.5))
    finally:
        nms_triton._MAX_BLOCK = saved
    return {"cases": len(out), "total_suppressed": sum(s["suppressed"] for s in out)}


def check_nms_ties(device: str = "cpu") -> Dict:
    """IoU exactly at the threshold does not suppress (strict '>'), identical
    boxes (IoU 1) do, and the float32-IoU vs double-threshold comparison of
    torchvision is reproduced (IoU float32(0.3) > 0.3 suppresses)."""
    # pairs (kept first, then the candidate), spread 100 apart (exact floats)
    pairs = {
        "iou_0.5": ([0, 0, 2, 1], [0, 0, 1, 1]),  # 1 / (2 + 1 - 1) = 0.5 exactly
        "iou_1.0": ([3, 4, 9, 8], [3, 4, 9, 8]),  # identical
        "iou_0.7": ([0, 0, 10, 1], [0, 0, 7, 1]),  # float32(7/10) < 0.7 (double)
        "iou_0.3": ([0, 0, 10, 1], [0, 0, 3, 1]),  # float32(3/10) > 0.3 (double)
        "disjoint": ([0, 0, 1, 1], [1, 0, 2, 1]),  # touching: IoU 0
    }
    rows = []
    for k, (a, b) in enumerate(pairs.values()):
        off = torch.tensor([100.0 * k, 0.0, 100.0 * k, 0.0])
        rows += [torch.tensor(a, dtype=torch.float32) + off, torch.tensor(b, dtype=torch.float32) + off]
    boxes = torch.stack(rows)[None].to(device)  # [1, 10, 4]
    valid = torch.ones(1, boxes.shape[1], dtype=torch.bool, device=device)
    names = list(pairs)
    expected = {  # is the second box of each pair kept?
        0.3: {"iou_0.5": False, "iou_1.0": False, "iou_0.7": False, "iou_0.3": False, "disjoint": True},
        0.5: {"iou_0.5": True, "iou_1.0": False, "iou_0.7": False, "iou_0.3": True, "disjoint": True},
        0.7: {"iou_0.5": True, "iou_1.0": False, "iou_0.7": True, "iou_0.3": True, "disjoint": True},
    }
    for thr, exp in expected.items():
        for labels in (None, torch.zeros(1, boxes.shape[1], dtype=torch.int64, device=device)):
            _compare_keep(boxes, valid, labels, thr)
            keep = nms_triton.nms_padded(boxes, valid, labels, thr).cpu()[0]
            assert keep[0::2].all(), keep
            got = {n: bool(keep[2 * i + 1]) for i, n in enumerate(names)}
            assert got == exp, f"thr={thr}: {got} != {exp}"
    # different labels never suppress each other, even identical boxes
    labels = torch.arange(boxes.shape[1], device=device)[None] % 2
    assert nms_triton.nms_padded(boxes, valid, labels, 0.5).all()
    return {"thresholds": sorted(expected)}


# ---------------------------------------------------------------------- RoIAlign
_SIZES = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
_SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]
_IMAGE_HW = (128, 160)


def _random_rois(R: int, num_levels: int, N: int, seed: int, device: str):
    gen = torch.Generator().manual_seed(seed)
    H, W = _IMAGE_HW
    wh = torch.exp(torch.empty(R, 2).uniform_(0.0, 5.3, generator=gen))  # ~1 .. 200 px
    xy = torch.rand(R, 2, generator=gen) * torch.tensor([W + 40.0, H + 40.0]) - 40.0  # partly outside
    rois = torch.cat([xy, xy + wh], dim=1)
    rois[0] = torch.tensor([10.0, 12.0, 10.0, 50.0])  # zero width
    rois[1] = torch.tensor([-30.0, 20.0, 60.0, 20.0])  # zero height, partly outside
    rois[2] = torch.tensor([3.3, 4.7, 3.3, 4.7])  # a point
    rois[3] = torch.tensor([-50.0, -60.0, -45.0, -50.0])  # fully outside
    rois[4] = torch.tensor([0.0, 0.0, float(W), float(H)])  # whole image
    rois[5] = torch.tensor([150.0, 120.0, 175.0, 140.0])  # over the bottom-right edge
    batch_idx = torch.randint(0, N, (R,), generator=gen)
    levels = torch.randint(0, num_levels, (R,), generator=gen)
    levels[: min(R, num_levels)] = torch.arange(min(R, num_levels))
    return rois.to(device), batch_idx.to(device), levels.to(device)


def _reference_roi_align(features, rois, batch_idx, levels, scales, P, sr, aligned):
    out = []
    feats = [f.float().cpu() for f in features]
    rois, batch_idx, levels = rois.cpu(), batch_idx.cpu(), levels.cpu()
    for r in range(rois.shape[0]):
        lv = int(levels[r])
        box = torch.cat([batch_idx[r : r + 1, None].float(), rois[r : r + 1]], 1)
        out.append(torchvision.ops.roi_align(feats[lv], box, P, scales[lv], sr, aligned))
    return torch.cat(out)


def _layout(features, kind: str):
    if kind == "contiguous":
        return [f.contiguous() for f in features]
    if kind == "channels_last":
        return [f.contiguous(memory_format=torch.channels_last) for f in features]
    # mixed, and a non-dense view for the last level
    out = [f.contiguous(memory_format=torch.channels_last) if i % 2 == 0 else f.contiguous() for i, f in enumerate(features)]
    last = out[-1]
    padded = torch.zeros(*last.shape[:3], last.shape[3] + 3, dtype=last.dtype, device=last.device)
    padded[..., 1 : 1 + last.shape[3]] = last
    out[-1] = padded[..., 1 : 1 + last.shape[3]]
    return out


def _check_roi_align(dtype: torch.dtype, tol: float, device: str, configs, num_levels=4, C=8, R=24, seed=0) -> Dict:
    gen = torch.Generator().manual_seed(seed)
    N = 2
    base = [torch.randn(N, C, h, w, generator=gen) for h, w in _SIZES[:num_levels]]
    scales = _SCALES[:num_levels]
    rois, batch_idx, levels = _random_rois(R, num_levels, N, seed, device)
    worst = 0.0
    layouts = ("contiguous", "channels_last", "mixed")
    for i, (P, sr, aligned) in enumerate(configs):
        feats = _layout([f.to(dtype).to(device) for f in base], layouts[i % 3])
        got = roi_align_triton.roi_align_multilevel(feats, rois, batch_idx, levels, scales, P, sr, aligned)
        assert got.dtype == torch.float32 and tuple(got.shape) == (R, C, P, P), (got.dtype, got.shape)
        ref = _reference_roi_align(feats, rois, batch_idx, levels, scales, P, sr, aligned)
        diff = (got.cpu() - ref).abs()
        err = float(diff.max())
        assert err < tol, (
            f"roi_align mismatch {err:.3g} (dtype={dtype}, P={P}, sampling={sr}, aligned={aligned}, "
            f"layout={layouts[i % 3]}, worst row {int(diff.amax(dim=(1, 2, 3)).argmax())})"
        )
        worst = max(worst, err)
    return {"configs": len(configs), "max_abs_diff": worst}


_ALL_CONFIGS = [(P, sr, al) for P in (7, 14) for sr in (2, 0) for al in (False, True)]


def check_roi_align_fp32(device: str = "cpu") -> Dict:
    """4 levels, float32, output 7/14 x sampling 2/0 x aligned F/T, three layouts."""
    return _check_roi_align(torch.float32, 1e-5, device, _ALL_CONFIGS)


def check_roi_align_lowp(device: str = "cpu") -> Dict:
    """bfloat16 and float16 features vs torchvision on the same values upcast."""
    a = _check_roi_align(torch.bfloat16, 1e-2, device, [(7, 2, False), (14, 0, True)], seed=1)
    b = _check_roi_align(torch.float16, 1e-2, device, [(7, 0, False)], seed=2)
    return {"max_abs_diff": max(a["max_abs_diff"], b["max_abs_diff"])}


def check_roi_align_levels(device: str = "cpu") -> Dict:
    """1 and 5 levels, C = 5 (not a power of two, several channel blocks)."""
    a = _check_roi_align(torch.float32, 1e-5, device, [(7, 2, False), (14, 0, True)], num_levels=5, C=5, R=12, seed=3)
    b = _check_roi_align(torch.float32, 1e-5, device, [(7, 0, False)], num_levels=1, C=5, R=8, seed=4)
    empty = roi_align_triton.roi_align_multilevel(
        [torch.zeros(1, 3, 4, 4, device=device)], torch.zeros(0, 4, device=device),
        torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device),
        [0.25], 7, 2)
    assert tuple(empty.shape) == (0, 3, 7, 7)
    return {"max_abs_diff": max(a["max_abs_diff"], b["max_abs_diff"])}


def check_nms_large(device: str = "cpu") -> Dict:
    """K = 2500 (three 1024-wide blocks, default config); too slow for the
    interpreter, run on CUDA only."""
    boxes, valid, labels = _random_groups(3, 2500, seed=11, device=device)
    out = [_compare_keep(boxes, valid, labels, 0.7), _compare_keep(boxes, valid, None, 0.5)]
    return {"cases": len(out), "total_suppressed": sum(s["suppressed"] for s in out)}


def check_roi_align_large(device: str = "cpu") -> Dict:
    """Realistic FPN shapes (C = 256, 5 levels, 300 RoIs); CUDA only."""
    return _check_roi_align(torch.float32, 1e-5, device, [(7, 2, False), (14, 2, False), (7, 0, True)],
                            num_levels=5, C=256, R=300, seed=5)


CHECKS: Dict[str, Callable[[str], Dict]] = {
    "nms_random": check_nms_random,
    "nms_multiblock": check_nms_multiblock,
    "nms_ties": check_nms_ties,
    "roi_align_fp32": check_roi_align_fp32,
    "roi_align_lowp": check_roi_align_lowp,
    "roi_align_levels": check_roi_align_levels,
    # GPU only (too slow for the interpreter)
    "nms_large": check_nms_large,
    "roi_align_large": check_roi_align_large,
}

GPU_ONLY = ("nms_large", "roi_align_large")


def main(argv: List[str]) -> int:
    device = os.environ.get("SEGCLI_CHECK_DEVICE", "cpu")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("CPU checks need TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    if not nms_triton.AVAILABLE:
        print("triton is not installed", file=sys.stderr)
        return 3
    torch.set_num_threads(1)
    for name in argv or [n for n in CHECKS if n not in GPU_ONLY]:
        t0 = time.perf_counter()
        stats = CHECKS[name](device)
        print(json.dumps({"check": name, "ok": True, "seconds": round(time.perf_counter() - t0, 2), **stats}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
