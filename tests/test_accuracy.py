"""The accuracy study's claim on a short run: every precision mode but bfloat16
parameters alone ends within 2% of float32's held-out loss (`bench.accuracy`; the
committed study runs longer)."""

import pytest
import torch

from bench import accuracy

TOLERANCE = 0.02


@pytest.fixture(scope="module")
def setting():
    config = accuracy.Config(quick=True, steps=60)
    torch.manual_seed(0)
    everything = accuracy.standard_library_text(config.characters)
    split = len(everything) * 9 // 10
    start = accuracy.CharModel(config).state_dict()
    reference = accuracy.train(
        "float32", False, everything[:split], everything[split:], config, start
    )
    return config, everything[:split], everything[split:], start, reference


@pytest.mark.parametrize(
    "mode", [m for m in accuracy.MODES if m not in ("float32", accuracy.UNCOMPENSATED)]
)
def test_mode_within_two_percent_of_float32(setting, mode):
    config, text, held_out, start, reference = setting
    run = accuracy.train(mode, False, text, held_out, config, start)
    if "skipped" in run:
        pytest.skip(run["skipped"])
    assert reference["final"] < reference["curve"][0][1] - 0.3  # it learned something
    assert abs(run["final"] / reference["final"] - 1) <= TOLERANCE
