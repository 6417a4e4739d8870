"""``python -m bench.gpu_check`` without a GPU: ``--list`` names every optimizer × mode
the registry claims for CUDA, and a run says plainly that it needs a GPU."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmomentum.capabilities import CAPABILITIES

ROOT = Path(__file__).resolve().parents[1]
SHORT = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16"}
#: Registry names -> the words of the listed mode.
STATE = {"bfloat16": "bf16 state", "int8_blockwise": "int8 state"}
SIXTEEN_BIT = {
    "master_weights": "master weights",
    "stochastic_rounding": "stochastic rounding",
    "kahan_sum": "Kahan",
}


def claimed_modes(row):
    """The modes a registry row claims, as the listing words them."""
    modes = {SHORT[dtype] for dtype in row.param_dtypes}
    modes |= {STATE[state] for state in row.state_dtypes if state != "param"}
    modes |= {f"bf16 {SIXTEEN_BIT[option]}" for option in row.sixteen_bit_options}
    if row.step_in_backward:
        modes.add("step in backward")
    if row.capturable:
        modes |= {"capturable", "capturable, CUDA graph"}
    return modes


def listed():
    """(optimizer, mode) -> (reference, bound), from ``--list`` run as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in CAPABILITIES:
            name, _, mode, reference, bound = cells
            rows[(name, mode)] = (reference, bound)
    return rows, result.stdout


def test_list_covers_every_optimizer_and_mode_the_registry_claims_for_cuda():
    rows, output = listed()
    for name, row in CAPABILITIES.items():
        modes = {mode for optimizer, mode in rows if optimizer == name}
        if not row.cuda:
            assert not modes, f"{name} claims no CUDA but is checked"
            continue
        missing = claimed_modes(row) - modes
        assert not missing, f"{name}: modes not checked: {sorted(missing)}"
    assert "bits" in output and "rtol" in output  # the bounds are stated


def test_references_are_torch_where_torch_has_the_optimizer():
    rows, _ = listed()
    for (name, mode), (reference, bound) in rows.items():
        if mode == "step in backward":  # against the ordinary loop, as on the CPU
            assert (reference, bound) == ("our CUDA step", "bits")
        elif mode == "capturable, CUDA graph":  # against the same steps without a graph
            assert (reference, bound) == ("our capturable step", "bits"), (name, mode)
        elif CAPABILITIES[name].torch_peer is None:
            assert reference == "our CPU step", (name, mode)
        elif mode in ("fp32", "fp64"):
            assert reference.startswith("torch"), (name, mode, reference)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: a run would start")
def test_without_a_gpu_a_run_says_so():
    from bench import gpu_check

    with pytest.raises(SystemExit, match="no CUDA GPU visible.*--list"):
        gpu_check.main([])


@pytest.mark.parametrize("jobs", [1, 2])
def test_checks_shared_over_processes_come_back_in_order(jobs):
    from bench import gpu_check

    found = gpu_check.in_processes(abs, [-3, 1, -4, 1, -5, 9, -2, 6], jobs)
    assert list(found) == [3, 1, 4, 1, 5, 9, 2, 6]


def test_parts_are_chosen_by_name_and_a_wrong_one_is_refused():
    from bench import gpu_check

    assert gpu_check.parts("bandwidth") == ["bandwidth"]
    assert gpu_check.parts("bandwidth, parity") == ["bandwidth", "parity"]
    with pytest.raises(argparse.ArgumentTypeError, match="parity, bandwidth.*'speed'"):
        gpu_check.parts("speed")


def test_the_report_is_on_disk_after_each_row(tmp_path):
    from bench import gpu_check

    report = gpu_check.Report(tmp_path / "out" / "gpu_check.md", ["# GPU check"])
    report.add("| a | ok |")
    assert (tmp_path / "out" / "gpu_check.md").read_text() == "# GPU check\n| a | ok |\n"
