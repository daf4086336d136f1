"""Tests of the Triton kernels (segcli.ops.nms_triton, segcli.ops.roi_align_triton).

* On any machine with triton installed: the kernels run on the CPU through the
  Triton interpreter, in a subprocess (``TRITON_INTERPRET=1`` must be set
  before triton is imported, and must not leak into this test session), and
  are compared with torchvision by ``tests/triton_interpreter_check.py``.
* Without a GPU, the kernels are also compiled ahead of time for sm_80 and
  sm_90 (PTX + cubin through ptxas), which catches what the interpreter
  accepts but the compiler does not.
* With CUDA: the same checks run directly on the GPU, and the launches are
  checked to make no device-to-host synchronisation.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CHECK_SCRIPT = os.path.join(HERE, "triton_interpreter_check.py")

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")

CHECK_NAMES = ["nms_ties", "nms_random", "nms_multiblock", "roi_align_fp32", "roi_align_lowp", "roi_align_levels"]
CUDA_ONLY_CHECKS = ["nms_large", "roi_align_large"]


def _load_checks():
    spec = importlib.util.spec_from_file_location("triton_interpreter_check", CHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------ without triton
def test_modules_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "from segcli.ops import nms_triton, roi_align_triton\n"
        "assert nms_triton.AVAILABLE is False and roi_align_triton.AVAILABLE is False\n"
        "import torch\n"
        "for call in (lambda: nms_triton.nms_padded(torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), None, 0.5),\n"
        "             lambda: roi_align_triton.roi_align_multilevel([torch.zeros(1, 1, 2, 2)], torch.zeros(1, 4),\n"
        "                 torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), [1.0], 2, 2)):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        assert 'Triton' in str(e)\n"
        "    else:\n"
        "        raise AssertionError('expected RuntimeError')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_strict_threshold_matches_double_comparison():
    from segcli.ops.iou_threshold import float32_threshold

    rng = torch.Generator().manual_seed(0)
    thresholds = [0.3, 0.5, 0.7, 0.1, 0.45, 0.65, 0.0, 1.0] + torch.rand(50, generator=rng, dtype=torch.float64).tolist()
    for thr in thresholds:
        t = torch.tensor(float32_threshold(thr), dtype=torch.float32)
        # every float32 near the threshold compares the same either way
        f = torch.tensor(thr, dtype=torch.float32)
        candidates = [f]
        for _ in range(3):
            candidates = [torch.nextafter(c, torch.tensor(d, dtype=torch.float32)) for c in candidates for d in (-1.0, 2.0)] + candidates
        for c in candidates:
            assert bool(c > t) == (float(c) > thr), (thr, float(c), float(t))


def test_launch_code_has_no_host_sync():
    from segcli.ops import nms_triton, roi_align_triton

    for fn in (nms_triton.nms_padded, roi_align_triton.roi_align_multilevel):
        src = inspect.getsource(fn)
        for banned in (".item(", ".cpu(", "nonzero", ".tolist(", "synchronize", "int(levels", "int(batch"):
            assert banned not in src, (fn.__name__, banned)


def test_launch_configs():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from segcli.ops import nms_triton, roi_align_triton

    for K in (1, 37, 300, 1000, 1024, 4096):
        block, warps = nms_triton._launch_config(K)
        assert block >= min(K, 1024) and block <= 1024 and block & (block - 1) == 0 and 1 <= warps <= 8
    for C, P in ((256, 7), (256, 14), (8, 28), (3, 1)):
        bc, bp, warps = roi_align_triton._launch_config(C, P, P)
        assert bp >= P * P and bc * bp <= 1024 and 1 <= warps <= 8


# ------------------------------------------------- Triton interpreter (CPU)
# One subprocess per kernel (importing torch + triton costs a few seconds);
# the script prints one JSON line per check and stops at the first failure.
INTERPRETER_GROUPS = {
    "nms": ["nms_ties", "nms_random", "nms_multiblock"],
    "roi_align": ["roi_align_fp32", "roi_align_lowp", "roi_align_levels"],
}


@needs_triton
@pytest.mark.parametrize("kernel", sorted(INTERPRETER_GROUPS))
def test_kernel_in_triton_interpreter(kernel):
    checks = INTERPRETER_GROUPS[kernel]
    env = {**os.environ, "TRITON_INTERPRET": "1", "SEGCLI_CHECK_DEVICE": "cpu"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::RuntimeWarning", CHECK_SCRIPT, *checks],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["check"] for r in results] == checks and all(r["ok"] for r in results), proc.stdout
    for r in results:
        print(r)


# ---------------------------------------- ahead-of-time GPU compilation (no GPU)
def _aot_compile(kernel, signature, constexprs, arch, num_warps):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(kernel, sig, constexprs=constexprs)
    opts = {"num_warps": num_warps, "num_stages": 1, "enable_fp_fusion": False}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter mode: no compilation")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    import triton

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton has no NVIDIA backend")
    from segcli.ops import nms_triton, roi_align_triton

    nms_sig = {"boxes_ptr": "*fp32", "valid_ptr": "*u8", "labels_ptr": "*i64", "keep_ptr": "*u8",
               "K": "i32", "iou_threshold": "fp32"}
    for has_labels in (True, False):
        k = _aot_compile(nms_triton._nms_padded_kernel, nms_sig, {"HAS_LABELS": has_labels, "BLOCK": 1024}, arch, 8)
        ptx = k.asm["ptx"]
        # bit-exact IoU: no contraction into FMA, IEEE division; barrier between greedy steps
        assert "fma." not in ptx and "div.rn.f32" in ptx and "bar.sync" in ptx
        assert "ld.global.nc" not in ptx  # keep[] is re-read after being written
        assert k.asm.get("cubin")

    roi_sig = {"out_ptr": "*fp32", "rois_ptr": "*fp32", "batch_ptr": "*i64", "level_ptr": "*i64"}
    for dtype in ("*fp32", "*bf16"):
        sig = dict(roi_sig)
        sig.update({f"f{i}": dtype for i in range(5)})
        for i in range(5):
            sig.update({f"{a}{i}": "i32" for a in ("H", "W", "sN", "sC", "sH", "sW")})
            sig[f"scale{i}"] = "fp32"
        sig["C"] = "i32"
        for P, sr, aligned, c_contig, w_contig in ((7, 2, False, False, True), (14, 0, True, True, False)):
            block_c, block_p, warps = roi_align_triton._launch_config(256, P, P)
            const = dict(NUM_LEVELS=5, PH=P, PW=P, SAMPLING=sr, ALIGNED=aligned, C_CONTIG=c_contig,
                         W_CONTIG=w_contig, BLOCK_C=block_c, BLOCK_P=block_p)
            k = _aot_compile(roi_align_triton._roi_align_multilevel_kernel, sig, const, arch, warps)
            assert k.asm.get("cubin")


# ------------------------------------------------------------- real GPU
@needs_cuda
@pytest.mark.parametrize("check", CHECK_NAMES + CUDA_ONLY_CHECKS)
def test_kernel_on_cuda(check):
    checks = _load_checks()
    print(checks.CHECKS[check]("cuda"))


@needs_cuda
def test_no_host_sync_on_cuda():
    from segcli.ops import nms_triton, roi_align_triton

    checks = _load_checks()
    boxes, valid, labels = checks._random_groups(4, 300, seed=0, device="cuda")
    feats = [torch.randn(2, 8, h, w, device="cuda") for h, w in checks._SIZES[:4]]
    rois, batch_idx, levels = checks._random_rois(16, 4, 2, seed=0, device="cuda")
    scales = checks._SCALES[:4]

    def run():
        return (
            nms_triton.nms_padded(boxes, valid, labels, 0.5),
            nms_triton.nms_padded(boxes, valid, None, 0.7),
            roi_align_triton.roi_align_multilevel(feats, rois, batch_idx, levels, scales, 14, 2, True),
            roi_align_triton.roi_align_multilevel(feats, rois, batch_idx, levels, scales, 7, 0),
        )

    run()  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync now raises
    try:
        keep, keep2, out, out2 = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert keep.shape == (4, 300) and keep2.shape == (4, 300)
    assert out.shape == (16, 8, 14, 14) and out2.shape == (16, 8, 7, 7)
