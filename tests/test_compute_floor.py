"""benchmarks/compute_floor.py counts the work of segcli's fused CPU model by hooks on its own
layer classes; torch's FlopCounterMode counts the same model unfused from the operators it
dispatches. The two must agree, or the printed floor (and the ceilings drawn from it) are wrong."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.compute_floor import model_macs
from segcli.data.decode import Decoded
from segcli.device import prepare_for_inference
from segcli.model.build import model_from_checkpoint
from segcli.predict.core import Predictor


def test_fused_model_macs_equal_torchs_count_of_the_unfused_model() -> None:
    rng = np.random.default_rng(0)
    image = Decoded(None, 0, rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), None)
    fused = Predictor.load("shapes_demo", None, "cpu", "fp32", 0.05, 100, progress=False)
    counted = model_macs(fused, [image])
    assert counted["bf16"] == 0 and counted["fp32"] > 1e8

    settings = fused.model.roi_heads.settings
    plain = prepare_for_inference(model_from_checkpoint(fused.checkpoint, settings), torch.device("cpu"), "fp32")
    plain.roi_heads.restrict_labels([True] * len(fused.checkpoint.label_to_category_id))
    reference = Predictor(plain, fused.checkpoint, torch.device("cpu"))
    with FlopCounterMode(display=False) as flops, torch.inference_mode():
        found = reference.predict([image])[0]
    assert len(found.scores) > 0  # the mask head ran, so its layers are in both counts
    # FlopCounterMode counts 2 flops per multiply-accumulate.
    by_operator = {str(op): n / 2 for op, n in flops.get_flop_counts()["Global"].items()}  # 2 flops per MAC
    # The layers are convolutions and addmm (linear, the RPN's 1x1s); mm and bmm come from the
    # resize and mask pasting, which the floor leaves out (a fraction of a percent of the work).
    layers = by_operator.pop("aten.convolution") + by_operator.pop("aten.addmm")
    assert counted["fp32"] == layers
    assert sum(by_operator.values()) < 0.01 * layers
