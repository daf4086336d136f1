"""segcli's own int8 path (`segcli quantize --out x.pt`, segcli.model.int8): each int8 layer
against the float32 layer it replaces, the whole demo model's AP against ground truth, and the
file's checks (checksum, precision, device, CPUs without int8 dot products, export refusal).

The int8 operators are oneDNN's CPU kernels; they compute the same numbers with or without VNNI
(slower without), so these tests run on any x86 CPU, with the CPU check set per test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from segcli.cli import app
from segcli.model import int8
from segcli.model.cpu_fusion import FusedConv2d, FusedLinear, FusedResidualBlock
from tests.conftest import synthetic_shapes

pytestmark = pytest.mark.skipif(not int8.int8_kernels_available(), reason="this torch build has no oneDNN int8 operators")

EXAMPLES = str(Path(__file__).parents[1] / "examples" / "images")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def error_lines(result) -> list[str]:
    return [line for line in (result.stderr or result.output).splitlines() if line.strip()]


def calibrated(layer: nn.Module, inputs: list[torch.Tensor], **kwargs) -> dict:
    observer = int8.RangeObserver()
    for x in inputs:
        observer.see(x, layer(x, **kwargs))
    return observer.as_dict()


def dequantized(y) -> torch.Tensor:
    return (y.data.float() - y.zero_point) * y.scale if isinstance(y, int8.QMap) else y.float()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def simulate(fused: FusedConv2d, layer: "int8.Int8Conv2d", x: torch.Tensor) -> torch.Tensor:
    """What the int8 layer computes, in float64: input on its u8 grid, weights on their per-channel
    s8 grids, exact sums, bias, ReLU."""
    from torch.nn import functional as F

    xq = torch.clamp(torch.round(x.double() / layer.in_scale) + layer.in_zero_point, 0, 255)
    weight, scales = int8._weight_qparams(fused.weight)
    padding, stride, dilation, groups = fused.geometry
    y = F.conv2d((xq - layer.in_zero_point) * layer.in_scale, weight.double() * scales.double().view(-1, 1, 1, 1),
                 fused.bias.double(), stride, padding, dilation, groups)
    return y.relu() if fused.unary == "relu" else y


def conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    layer = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
    nn.init.normal_(layer.weight, std=(2.0 / (cin * kernel * kernel)) ** 0.5)
    nn.init.normal_(layer.bias, std=0.1)
    return layer.eval()


@pytest.mark.parametrize("relu, out, stride", [(True, "u8", 1), (False, "u8", 2), (True, torch.float32, 1),
                                               (False, torch.bfloat16, 1)])
def test_int8_conv_matches_float32_within_its_grid(relu, out, stride):
    torch.manual_seed(0)
    fused = FusedConv2d(conv(32, 48, 3, stride), relu, torch.float32)
    x = torch.randn(2, 32, 23, 31).contiguous(memory_format=torch.channels_last)
    want = fused(x)
    layer = int8.Int8Conv2d(fused, calibrated(fused, [x]), out)
    got = layer(x)
    assert isinstance(got, int8.QMap) == (out == "u8")
    assert dequantized(got).shape == want.shape
    # Against float32: a few grid steps of error, nowhere near a wrong stride, padding or scale.
    assert relative_error(dequantized(got), want) < 0.03
    # Against the same arithmetic simulated in float64 on the int8 grids: one output step at most.
    simulated = simulate(fused, layer, x)
    if out == "u8":
        expected = torch.clamp(torch.round(simulated / layer.out_scale) + layer.out_zero_point, 0, 255)
        assert float((got.data.double() - expected).abs().max()) <= 1
    else:
        assert float((got.double() - simulated).abs().max() / simulated.abs().max()) < (1e-5 if out == torch.float32 else 1e-2)


def test_int8_conv_with_residual_sum_matches_float32():
    torch.manual_seed(1)
    fused = FusedConv2d(conv(16, 32, 1), True, torch.float32)
    x = torch.randn(1, 16, 20, 24).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(1, 32, 20, 24).contiguous(memory_format=torch.channels_last)
    want = fused(x, residual=residual)
    layer = int8.Int8Conv2d(fused, calibrated(fused, [x], residual=residual), "u8")
    lo, hi = float(residual.min()), float(residual.max())
    shortcut = int8.quantize(residual, *int8.qparams(lo, hi))
    got = layer(x, residual=shortcut)
    assert relative_error(dequantized(got), want) < 0.03


def test_int8_linear_matches_float32():
    torch.manual_seed(2)
    linear = nn.Linear(96, 40)
    fused = FusedLinear(linear, True, torch.float32)
    x = torch.randn(50, 96)
    want = fused(x)
    layer = int8.Int8Linear(fused, calibrated(fused, [x]), torch.float32)
    assert relative_error(layer(x), want) < 0.03


@pytest.mark.parametrize("make", ["bottleneck", "basic"])
def test_int8_residual_block_matches_float32(make):
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from segcli.model.fuse import fold_batchnorm

    torch.manual_seed(3)
    if make == "bottleneck":
        block = Bottleneck(64, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(64, 64, 1, stride=2, bias=False),
                                                                      nn.BatchNorm2d(64)))
    else:
        block = BasicBlock(32, 32)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial folded statistics
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    block.eval()
    fold_batchnorm(block)
    fused = FusedResidualBlock(block, torch.float32)
    x = torch.randn(1, block.conv1.in_channels, 32, 40).relu().contiguous(memory_format=torch.channels_last)
    observers = int8.observe(fused)
    want = fused(x)
    int8.release(fused)
    ranges = {f"b.{name}": o.as_dict() for name, o in observers.items()}
    got = int8.Int8ResidualBlock(fused, ranges, "b")(x.clone())
    assert relative_error(dequantized(got), want) < 0.05


def test_qparams_cover_zero_and_the_range():
    scale, zero_point = int8.qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255) and zero_point == 64
    assert int8.qparams(0.0, 2.55) == (pytest.approx(0.01), 0)
    assert int8.qparams(0.0, 0.0) == (1.0, 0)  # a layer that never fired


# -- the whole model, through the CLI ---------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    module = synthetic_shapes()
    module.generate(root / "calibration", images=10, size=160, seed=31)
    truth = module.generate(root / "eval", images=12, size=160, seed=20261207)
    return root, truth


@pytest.fixture(scope="module")
def int8_checkpoint(shapes):
    root, _ = shapes
    out = root / "demo-int8.pt"
    result = invoke("quantize", "--weights", "shapes_demo", "--images", str(root / "calibration" / "images"),
                    "--out", str(out), "--calibration-images", "6")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "int8 keeps" in result.output and "sha256" in result.output
    return out


@pytest.fixture
def int8_anyway(monkeypatch):
    monkeypatch.setenv("SEGCLI_INT8_ANYWAY", "1")


def test_int8_checkpoint_records_its_calibration(int8_checkpoint):
    from segcli.export.quantize_native import int8_digest
    from segcli.weights import resolve_weights

    checkpoint = resolve_weights(str(int8_checkpoint))
    section = checkpoint.int8
    assert section["version"] == 1 and section["calibration_images"] == 6 and section["weights"] == "shapes_demo"
    assert section["sha256"] == int8_digest(checkpoint.state_dict, section["ranges"], section["scope"])
    # Every layer the model converts has a range; the float weights are the demo model's own.
    demo = resolve_weights("shapes_demo")
    assert all(torch.equal(demo.state_dict[k], v) for k, v in checkpoint.state_dict.items())
    assert section["layers"] > 30 and all(r["in_shape"] for r in section["ranges"].values())


def test_int8_mask_ap_stays_near_float32(shapes, int8_checkpoint, int8_anyway, tmp_path):
    """The demo model on fresh shapes: int8 within 3 AP points of fp32 on 12 photos (the issue's bar
    is 1.0 on the benchmark's larger sets), and the int8 model really runs int8 layers."""
    from segcli.evaluate.run import evaluate_files
    from segcli.predict import core

    root, truth = shapes
    images = str(root / "eval" / "images")
    reports = {}
    for name, weights, precision in (("fp32", "shapes_demo", "fp32"), ("int8", str(int8_checkpoint), "int8")):
        out = tmp_path / f"{name}.json"
        result = invoke("predict", images, "--weights", weights, "--precision", precision, "--score-thr", "0.05",
                        "--out", str(out), "-q")
        assert result.exit_code == 0, result.output
        reports[name] = evaluate_files(truth, out)
    print({k: (round(r["segm"]["AP"], 4), round(r["bbox"]["AP"], 4)) for k, r in reports.items()})
    fp32, quantized = reports["fp32"], reports["int8"]
    assert fp32["segm"]["AP"] > 0.5
    for iou_type in ("segm", "bbox"):
        assert quantized[iou_type]["AP"] >= fp32[iou_type]["AP"] - 0.03, (iou_type, fp32[iou_type], quantized[iou_type])
    model = core.Predictor.load(str(int8_checkpoint), None, "cpu", "auto", 0.05, 100, progress=False).model
    assert getattr(model, "int8", False)
    assert sum(isinstance(m, (int8.Int8Conv2d, int8.Int8Linear)) for m in model.modules()) == \
        core.Predictor.load(str(int8_checkpoint), None, "cpu", "int8", 0.05, 100, progress=False).checkpoint.int8["layers"]


def test_int8_predictions_are_deterministic(int8_checkpoint, int8_anyway, tmp_path):
    outputs = []
    for run in range(2):
        out = tmp_path / f"p{run}.json"
        assert invoke("predict", EXAMPLES, "--weights", str(int8_checkpoint), "--out", str(out), "-q").exit_code == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def _changed(checkpoint_path: Path, tmp_path: Path, change) -> Path:
    payload = torch.load(checkpoint_path, weights_only=True)
    change(payload)
    path = tmp_path / "changed-int8.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("what", ["weight", "range"])
def test_changed_int8_checkpoint_fails_its_checksum(int8_checkpoint, int8_anyway, tmp_path, what):
    def change(payload):
        if what == "weight":
            name = next(k for k, v in payload["model"].items() if v.dim() == 4)
            payload["model"][name] = payload["model"][name].clone()
            payload["model"][name].view(-1)[0] += 0.5
        else:
            first = next(iter(payload["meta"]["int8"]["ranges"].values()))
            first["out_hi"] *= 2

    out = tmp_path / "p.json"
    result = invoke("predict", EXAMPLES, "--weights", str(_changed(int8_checkpoint, tmp_path, change)), "--out", str(out))
    assert result.exit_code == 3, result.output
    [line] = error_lines(result)
    assert "was changed after segcli quantize wrote it" in line and not out.exists()


def test_int8_checkpoint_is_refused_on_a_cpu_without_int8_dot_products(int8_checkpoint, monkeypatch, tmp_path):
    import segcli.device

    monkeypatch.delenv("SEGCLI_INT8_ANYWAY", raising=False)
    monkeypatch.setattr(segcli.device, "cpu_flags", lambda: {"fpu", "sse2", "avx2", "fma"})
    out = tmp_path / "p.json"
    result = invoke("predict", EXAMPLES, "--weights", str(int8_checkpoint), "--out", str(out))
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert "no int8 dot-product instructions" in line and "shapes_demo" in line and not out.exists()


@pytest.mark.parametrize("flags, says", [
    (["--precision", "bf16"], "is an int8 model"),
    (["--precision", "fp32"], "is an int8 model"),
])
def test_int8_checkpoint_with_a_float_precision_is_one_line_exit_2(int8_checkpoint, int8_anyway, tmp_path, flags, says):
    result = invoke("predict", EXAMPLES, "--weights", str(int8_checkpoint), *flags, "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert says in line and "shapes_demo" in line


def test_int8_checkpoint_on_a_gpu_is_refused(int8_checkpoint, int8_anyway):
    from segcli.errors import UsageError
    from segcli.export.quantize_native import check_int8_checkpoint
    from segcli.weights import resolve_weights

    with pytest.raises(UsageError, match="int8 model for the CPU"):
        check_int8_checkpoint(resolve_weights(str(int8_checkpoint)), "auto", torch.device("cuda"))


def test_export_of_an_int8_checkpoint_is_refused(int8_checkpoint, tmp_path):
    out = tmp_path / "x.onnx"
    result = invoke("export", "--weights", str(int8_checkpoint), "--format", "onnx", "--out", str(out), "--no-verify")
    assert result.exit_code == 2, result.output
    assert "is an int8 model" in error_lines(result)[0] and not out.exists()


def test_quantizing_an_int8_checkpoint_again_is_refused(shapes, int8_checkpoint, tmp_path):
    root, _ = shapes
    out = tmp_path / "again.pt"
    result = invoke("quantize", "--weights", str(int8_checkpoint), "--images", str(root / "calibration" / "images"),
                    "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "already an int8 model" in error_lines(result)[0] and not out.exists()


def test_scope_backbone_converts_only_the_backbone(shapes, tmp_path, int8_anyway):
    from segcli.predict import core

    root, _ = shapes
    out = tmp_path / "backbone-int8.pt"
    result = invoke("quantize", "--weights", "shapes_demo", "--images", str(root / "calibration" / "images"),
                    "--out", str(out), "--calibration-images", "3", "--scope", "backbone", "-q")
    assert result.exit_code == 0, result.output
    model = core.Predictor.load(str(out), None, "cpu", "auto", 0.05, 100, progress=False).model
    assert any(isinstance(m, int8.Int8Conv2d) for m in model.backbone.modules())
    assert not any(isinstance(m, (int8.Int8Conv2d, int8.Int8Linear)) for m in model.roi_heads.modules())
