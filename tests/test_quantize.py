"""`segcli quantize` and int8 models in `segcli predict`: calibration, loading, checksum, refusal on
CPUs without int8 dot-product instructions, and mask AP against ground truth not collapsing.

The demo model is quantized once per module on synthetic shapes photos of one seed and scored on
photos of another. The CPU check is set per test (SEGCLI_INT8_ANYWAY, or a patched flag reader), so
the tests run the same on CPUs with and without VNNI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_int8 import error_lines, invoke
from tests.test_int8 import int8_anyway, shapes  # noqa: F401  (fixtures)

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def int8_model(shapes):  # noqa: F811
    root, _ = shapes
    out = root / "demo-int8.onnx"
    result = invoke("quantize", "--weights", "shapes_demo", "--images", str(root / "calibration" / "images"),
                    "--out", str(out), "--calibration-images", "6")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "sha256" in result.output and "int8 keeps" in result.output
    return out


def test_quantized_file_records_what_was_quantized_and_its_checksum(int8_model):
    from segcli.export.metadata import graph_digest

    model = onnx.load(str(int8_model))
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "segcli"))
    assert meta["precision"] == "int8" and meta["quantization"]["calibration_images"] == 6
    assert meta["graph_sha256"] == graph_digest(model)
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # The predictor layers stay float32: no weight of theirs is quantized.
    quantized_weights = {i for node in model.graph.node if node.op_type == "DequantizeLinear" for i in node.input}
    assert not any("cls_score" in name or "mask_fcn_logits" in name for name in quantized_weights)


def test_int8_mask_ap_stays_near_float32(shapes, int8_model, int8_anyway, tmp_path):  # noqa: F811
    """The demo model's mask and box AP on fresh shapes, int8 against fp32 (the issue's bar: within
    1.0 AP point on trained models; this small check allows 3 on 12 photos)."""
    from segcli.evaluate.run import evaluate_files

    root, truth = shapes
    images = str(root / "eval" / "images")
    reports = {}
    for name, weights, precision in (("fp32", "shapes_demo", "fp32"), ("int8", str(int8_model), "int8")):
        out = tmp_path / f"{name}.json"
        result = invoke("predict", images, "--weights", weights, "--precision", precision, "--score-thr", "0.05",
                        "--out", str(out), "-q")
        assert result.exit_code == 0, result.output
        reports[name] = evaluate_files(truth, out)
    fp32, int8 = reports["fp32"], reports["int8"]
    print({k: (round(r["segm"]["AP"], 4), round(r["bbox"]["AP"], 4)) for k, r in reports.items()})
    assert fp32["segm"]["AP"] > 0.5  # the demo model is trained: a collapse would show
    for iou_type in ("segm", "bbox"):
        assert int8[iou_type]["AP"] >= fp32[iou_type]["AP"] - 0.03, (iou_type, fp32[iou_type], int8[iou_type])


def test_int8_file_is_refused_on_a_cpu_without_int8_dot_products(int8_model, monkeypatch, tmp_path):
    import segcli.device

    monkeypatch.delenv("SEGCLI_INT8_ANYWAY", raising=False)
    monkeypatch.setattr(segcli.device, "cpu_flags", lambda: {"fpu", "sse2", "avx2", "fma"})
    out = tmp_path / "p.json"
    result = invoke("predict", str(Path(__file__).parents[1] / "examples" / "images"), "--weights", str(int8_model),
                    "--out", str(out))
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert "no int8 dot-product instructions" in line and "SEGCLI_INT8_ANYWAY" in line
    assert not out.exists()
    monkeypatch.setattr(segcli.device, "cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert segcli.device.cpu_int8_dot_product() == "avx512_vnni"


def test_changed_int8_file_fails_its_checksum(int8_model, int8_anyway, tmp_path):  # noqa: F811
    from onnx import numpy_helper

    model = onnx.load(str(int8_model))
    tensor = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4)
    values = numpy_helper.to_array(tensor).copy()
    values.flat[0] = values.flat[0] // 2 + 1
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    changed = tmp_path / "changed-int8.onnx"
    onnx.save(model, str(changed))
    result = invoke("predict", str(Path(__file__).parents[1] / "examples" / "images"), "--weights", str(changed),
                    "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 3, result.output
    [line] = error_lines(result)
    assert "does not match the checksum" in line


@pytest.mark.parametrize("weights, precision, says", [
    ("shapes_demo", "int8", "segcli quantize"),
    ("INT8", "bf16", "is an int8 model"),
    ("INT8", "fp32", "is an int8 model"),
])
def test_precision_that_does_not_fit_the_weights_is_one_line_exit_2(int8_model, int8_anyway, tmp_path,  # noqa: F811
                                                                   weights, precision, says):
    weights = str(int8_model) if weights == "INT8" else weights
    result = invoke("predict", str(Path(__file__).parents[1] / "examples" / "images"), "--weights", weights,
                    "--precision", precision, "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert says in line


def test_float32_export_with_precision_int8_points_to_quantize(tmp_path):
    export = tmp_path / "demo.onnx"
    assert invoke("export", "--weights", "shapes_demo", "--format", "onnx", "--out", str(export), "-q",
                  "--no-verify").exit_code == 0
    result = invoke("predict", str(Path(__file__).parents[1] / "examples" / "images"), "--weights", str(export),
                    "--precision", "int8", "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 2 and "segcli quantize" in error_lines(result)[0]


@pytest.mark.parametrize("flags, says", [
    (["--out", "model.int8"], "ending in .pt"),
    (["--calibration-images", "0"], "--calibration-images"),
    (["--scope", "heads"], "--scope"),
    (["--min-agreement", "1.5"], "--min-agreement"),
    (["--images", "no/such/folder"], "no/such/folder"),
])
def test_quantize_flag_errors_are_one_line_exit_2(shapes, tmp_path, flags, says):  # noqa: F811
    root, _ = shapes
    args = {"--weights": "shapes_demo", "--images": str(root / "calibration" / "images"),
            "--out": str(tmp_path / "q.onnx")}
    args.update(dict(zip(flags[::2], flags[1::2])))
    result = invoke("quantize", *[x for pair in args.items() for x in pair])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert says in line
    assert not list(tmp_path.iterdir())


def test_agreement_below_the_bar_writes_nothing(shapes, tmp_path, monkeypatch):  # noqa: F811
    """A quantization that loses detections is refused (exit 3) and leaves no file: here the bar is
    set above what any model can reach by making every float32 detection count twice."""
    import segcli.export.quantize as quantize

    real = quantize.agreement_of

    def halved(reference, candidate, photos):
        found = real(reference, candidate, photos)
        found.total *= 2
        return found

    monkeypatch.setattr(quantize, "agreement_of", halved)
    root, _ = shapes
    out = tmp_path / "q.onnx"
    result = invoke("quantize", "--weights", "shapes_demo", "--images", str(root / "calibration" / "images"),
                    "--out", str(out), "--calibration-images", "2", "--min-agreement", "0.9")
    assert result.exit_code == 3, result.output
    assert "nothing was written" in error_lines(result)[-1] and not out.exists()
