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
