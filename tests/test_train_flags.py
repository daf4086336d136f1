"""`segcli train`'s step-time breakdown and its flags --freeze-at, --scale-jitter, --patience,
--plots and --precision: a good value of each on a tiny synthetic set (seconds), and the bad
values (one line on stderr, exit 2)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from segcli.train import timing
from segcli.train.log import TrainDisplay


def test_step_timer_splits_the_step_by_phase(monkeypatch):
    clock = iter([0.0, 0.0, 0.010, 0.050, 0.110, 0.115, 0.116,  # step 1: data 10, fwd 40, bwd 60, opt 5, other 1 (ms)
                  0.146, 0.186, 0.246, 0.251, 0.252])  # step 2: data 30, then the same
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    timer = timing.StepTimer()
    timer.start()
    for _ in range(2):
        for phase in ("data", "forward", "backward", "optimizer"):
            timer.mark(phase)
        timer.step_done()
    summary = timer.summary()
    assert summary == pytest.approx({"data": 20.0, "forward": 40.0, "backward": 60.0, "optimizer": 5.0,
                                     "other": 1.0, "total": 126.0})
    assert list(summary) == ["data", "forward", "backward", "optimizer", "other", "total"]
    assert timing.breakdown_text(summary) == "step 126 ms: data 16%, forward 32%, backward 48%, optimizer 4%, other 1%"


def test_step_timer_on_a_gpu_reports_compute_as_one():
    timer = timing.StepTimer(split_compute=False)
    timer.start()
    for phase in ("data", "forward", "backward", "optimizer"):
        timer.mark(phase)
    timer.step_done()
    assert list(timer.summary()) == ["data", "compute", "other", "total"]


def test_epoch_line_shows_the_breakdown():
    stream = io.StringIO()
    with TrainDisplay(total=1, start=0, enabled=True, live=False, log_every=1, stream=stream) as display:
        display.epoch_done({"epoch": 2, "seconds": 3.0, "train_loss": 1.0,
                            "step_ms": {"data": 10.0, "forward": 30.0, "backward": 60.0, "total": 100.0}})
    assert "segcli: epoch 2 step 100 ms: data 10%, forward 30%, backward 60%\n" in stream.getvalue()


# --- the flags, on 2 synthetic 64 px images (one step per epoch) --------------------------------

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from segcli.cli import app  # noqa: E402
from segcli.errors import UsageError  # noqa: E402
from segcli.model.build import build_model  # noqa: E402
from segcli.train import options as train_options  # noqa: E402
from segcli.train.options import jitter_sizes  # noqa: E402
from segcli.train.recipe import freeze_stages, set_train_mode  # noqa: E402
from segcli.train.run import TrainOptions, run_train  # noqa: E402
from tests.conftest import synthetic_shapes  # noqa: E402

TINY = "maskrcnn_resnet18_fpn_tiny"


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> Path:
    return synthetic_shapes().generate(tmp_path_factory.mktemp("two"), images=2, size=64, seed=4)


def _options(coco: Path, out: Path, **overrides) -> TrainOptions:
    base = dict(coco=str(coco), arch=TINY, epochs=1, batch_size=2, min_sizes=[64], max_size=96, workers=0,
                out=str(out), device="cpu", quiet=True, log_every=1, lr=0.02, seed=1)
    base.update(overrides)
    return TrainOptions(**base)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_freeze_at_counts_stages_as_detectron2():
    model = build_model(TINY, 3)
    freeze_stages(model, 2)  # the stem and res2 (layer1)
    body = model.backbone.body
    assert not any(p.requires_grad for m in (body.conv1, body.bn1, body.layer1) for p in m.parameters())
    assert all(p.requires_grad for m in (body.layer2, body.layer3, body.layer4, model.rpn) for p in m.parameters())
    set_train_mode(model, freeze_bn=False, freeze_at=2)
    assert not body.bn1.training and not body.layer1[0].bn1.training and body.layer2[0].bn1.training
    assert freeze_stages(build_model(TINY, 3), 0) == 0
    assert all(not p.requires_grad for p in body.parameters()) is False
    whole = build_model(TINY, 3)
    freeze_stages(whole, 5)
    assert not any(p.requires_grad for p in whole.backbone.body.parameters())


def test_freeze_at_keeps_the_frozen_stages_and_jitter_sets_the_sizes(two_images, tmp_path):
    start = run_train(_options(two_images, tmp_path / "start", lr=1e-12)).last  # an initialization to compare with
    stderr = io.StringIO()
    summary = run_train(_options(two_images, tmp_path / "run", weights=str(start), arch=None, freeze_at=2,
                                 freeze_bn=False, min_sizes=None, scale_jitter=(48, 80), lr=0.05, quiet=False),
                        stderr=stderr)
    before, after = _state(start), _state(summary.last)
    for key in ("backbone.body.conv1.weight", "backbone.body.bn1.running_mean", "backbone.body.layer1.0.conv1.weight",
                "backbone.body.layer1.1.bn2.running_var"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(after["backbone.body.layer2.0.conv1.weight"], before["backbone.body.layer2.0.conv1.weight"])
    text = stderr.getvalue()
    assert "sizes [48, 64, 80]/96" in text and "--freeze-at 2 (" in text
    meta = torch.load(summary.last, weights_only=True)["meta"]
    assert meta["input_size"] == {"min_size": 80, "max_size": 96}  # the arch's 256, held within 48..80
    with pytest.raises(UsageError, match="was trained with --freeze-at 2; resume it with the same"):
        run_train(_options(two_images, tmp_path / "run", weights=str(start), arch=None, freeze_at=1, min_sizes=None,
                           scale_jitter=(48, 80), resume=True))
    assert jitter_sizes(640, 1000) == [640, 656, 672, 688, 704, 720, 736, 752, 768, 784, 800, 816, 832, 848, 864, 880,
                                       896, 912, 928, 944, 960, 976, 992, 1000]


def test_patience_stops_and_plots_are_drawn(two_images, tmp_path):
    run, plots = tmp_path / "run", tmp_path / "plots"
    stderr = io.StringIO()
    data = json.loads(two_images.read_text())
    data["images"] = data["images"][:1]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]]
    val = two_images.parent / "val.json"  # beside the images, which it names
    val.write_text(json.dumps(data))
    # A vanishing lr: the validation AP cannot improve after the first epoch.
    options = _options(two_images, run, epochs=3, lr=1e-12, val_coco=str(val), patience=1, plots=str(plots),
                       quiet=False)
    summary = run_train(options, stderr=stderr)
    assert summary.epochs == 2 and summary.best == run / "best.pt"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in epochs if "seconds" in m] == [1, 2]
    assert "--patience 1: stopped after epoch 2 of 3" in stderr.getvalue()
    step_ms = epochs[-1]["step_ms"]  # the breakdown, in the metrics log and on stderr
    assert list(step_ms) == ["data", "forward", "backward", "optimizer", "other", "total"]
    assert step_ms["forward"] > 0 and step_ms["backward"] > 0
    assert step_ms["total"] == pytest.approx(sum(v for k, v in step_ms.items() if k != "total"), abs=0.1)
    assert "segcli: epoch 2 step " in stderr.getvalue() and "%, backward " in stderr.getvalue()
    for name in ("loss.png", "ap.png"):
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.size == (800, 600)
            assert len(image.convert("RGB").getcolors(maxcolors=100000) or ()) > 3  # axes, text and curves drawn
    assert not list(plots.glob(".*")) and sorted(p.name for p in plots.iterdir()) == ["ap.png", "loss.png"]
    # --resume of a run that stopped early stays stopped.
    again = run_train(TrainOptions(**{**options.__dict__, "resume": True}), stderr=io.StringIO())
    assert again.epochs == 2 and again.iterations == summary.iterations


def test_bf16_trains_on_a_cpu_with_bf16_instructions(two_images, tmp_path, monkeypatch):
    monkeypatch.setattr(train_options, "cpu_has_fast_bf16", lambda: True)  # as on an AMX CPU, whatever this one is
    stderr = io.StringIO()
    summary = run_train(_options(two_images, tmp_path / "run", precision="bf16", quiet=False), stderr=stderr)
    assert "(bf16, 1 process(es)" in stderr.getvalue()
    state = _state(summary.last)
    assert state["backbone.body.conv1.weight"].dtype == torch.float32  # autocast: the weights stay float32
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_bf16_is_refused_on_a_cpu_without_bf16_instructions(two_images, tmp_path, monkeypatch):
    monkeypatch.setattr(train_options, "cpu_has_fast_bf16", lambda: False)
    for overrides in ({"precision": "bf16"}, {"amp": True}):
        with pytest.raises(UsageError, match="no bfloat16 instructions"):
            run_train(_options(two_images, tmp_path / "run", **overrides))
    result = CliRunner().invoke(app, ["train", "--coco", str(two_images), "--precision", "bf16", "--device", "cpu",
                                      "--out", str(tmp_path / "cli"), "-q"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX)" in result.output
    assert run_train(_options(two_images, tmp_path / "fp32", precision="fp32")).last.is_file()


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_the_default_precision_is_bf16_only_on_a_cpu_with_bf16_instructions(fast_bf16, expected, monkeypatch):
    monkeypatch.setattr(train_options, "cpu_has_fast_bf16", lambda: fast_bf16)
    cpu = torch.device("cpu")
    for options in (TrainOptions(coco="a.json"), TrainOptions(coco="a.json", precision="auto")):
        assert train_options.amp_precision(options, cpu) == expected
    assert train_options.amp_precision(TrainOptions(coco="a.json", amp=False), cpu) == "fp32"
    assert train_options.amp_precision(TrainOptions(coco="a.json", precision="fp32"), cpu) == "fp32"


@pytest.mark.parametrize("args, message", [
    (["--freeze-at", "6"], "--freeze-at must be 0 (train all) to 5"),
    (["--freeze-at", "-1"], "--freeze-at must be 0"),
    (["--scale-jitter", "96"], "--scale-jitter '96': give the shortest and longest"),
    (["--scale-jitter", "a,b"], "--scale-jitter 'a,b'"),
    (["--scale-jitter", "96,64"], "--scale-jitter 96,64: give MIN,MAX with 32 <= MIN <= MAX <= 8192"),
    (["--scale-jitter", "16,64"], "--scale-jitter 16,64"),
    (["--scale-jitter", "64,96", "--min-size", "64"], "--scale-jitter and --min-size both set"),
    (["--patience", "0", "--val-coco", "{coco}"], "--patience must be at least 1"),
    (["--patience", "2"], "--patience needs --val-coco"),
    (["--plots", ""], "--plots is empty"),
    (["--plots", "{coco}"], "--plots '{coco}' is --coco '{coco}', a file; give a folder"),
    (["--precision", "fp16"], "--precision 'fp16': choose auto, fp32 or bf16"),
    (["--precision", "fp32", "--no-amp"], "--precision and --amp/--no-amp both set the precision"),
])
def test_bad_flag_values_are_one_line_exit_2(two_images, tmp_path, args, message):
    args = [a.format(coco=two_images) for a in args]
    result = CliRunner().invoke(app, ["train", "--coco", str(two_images), *args, "--device", "cpu",
                                      "--out", str(tmp_path / "new"), "-q"])
    assert result.exit_code == 2, result.output
    assert message.format(coco=two_images) in result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / "new").exists()


def test_the_plot_legend_goes_where_no_curve_is():
    """A rising AP curve ends top right, where the legend used to hide it."""
    from segcli.evaluate.plots import COLOURS, MARGIN, SIZE
    from segcli.train.plots import draw_lines

    rising = [("segcli mask AP", [(x, x / 10) for x in range(11)])]
    falling = [("loss", [(x, 1 - x / 10) for x in range(11)])]
    right, top, bottom = SIZE[0] - MARGIN[2], MARGIN[1], SIZE[1] - MARGIN[3]
    legend_line_top_right = (right - 230 + 20, top + 6 + 14)
    legend_line_bottom_right = (right - 230 + 20, bottom - 6 - 28 + 14)
    image = draw_lines(rising, "t", "x", "y", y_max=1.0)
    assert image.getpixel(legend_line_bottom_right) == COLOURS[0]
    assert image.getpixel(legend_line_top_right) != COLOURS[0]
    image = draw_lines(falling, "t", "x", "y", y_max=1.0)  # top right is empty: the legend stays there
    assert image.getpixel(legend_line_top_right) == COLOURS[0]


def test_resume_continues_in_the_precision_the_run_trained_in(two_images, tmp_path, monkeypatch):
    """A run started on a CPU with bf16 and resumed where auto would choose otherwise (or the other
    way round) keeps its precision where it can, and says so; an explicit --precision wins."""
    monkeypatch.setattr(train_options, "cpu_has_fast_bf16", lambda: False)
    run = tmp_path / "fp32-run"
    run_train(_options(two_images, run))  # auto on this "CPU": fp32
    assert torch.load(run / "last.pt", weights_only=True)["training"]["precision"] == "fp32"
    monkeypatch.setattr(train_options, "cpu_has_fast_bf16", lambda: True)  # resumed where auto means bf16
    stderr = io.StringIO()
    run_train(_options(two_images, run, epochs=2, resume=True, quiet=False), stderr=stderr)
    assert "--resume: continuing in fp32, the precision the run trained in" in stderr.getvalue()
    assert "(fp32, 1 process(es)" in stderr.getvalue()

    bf16_run = tmp_path / "bf16-run"
    run_train(_options(two_images, bf16_run))  # auto: bf16
    assert torch.load(bf16_run / "last.pt", weights_only=True)["training"]["precision"] == "bf16"
    monkeypatch.setattr(train_options, "cpu_has_fast_bf16", lambda: False)  # resumed on a CPU without bf16
    stderr = io.StringIO()
    run_train(_options(two_images, bf16_run, epochs=2, resume=True, quiet=False), stderr=stderr)
    assert "the run trained in bf16, which this cpu cannot run fast; continuing in fp32" in stderr.getvalue()
    assert torch.load(bf16_run / "last.pt", weights_only=True)["training"]["precision"] == "fp32"

    monkeypatch.setattr(train_options, "cpu_has_fast_bf16", lambda: True)
    stderr = io.StringIO()
    run_train(_options(two_images, run, epochs=3, resume=True, quiet=False, precision="bf16"), stderr=stderr)
    assert "--resume:" not in stderr.getvalue() and "(bf16, 1 process(es)" in stderr.getvalue()
