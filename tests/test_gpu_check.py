"""``python -m bench.gpu_check`` without a GPU: ``--list`` names every optimizer × mode
the registry claims for CUDA, and a run says plainly that it needs a GPU."""

import argparse
import os
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


def test_the_exactness_part_counts_differing_elements(monkeypatch, tmp_path):
    """Its plumbing, on the CPU against itself (a GPU run compares the CUDA step): one
    row, small data; nothing differs and no PTX was compiled."""
    from bench import gpu_check

    rows = {"SGD momentum": gpu_check.benchmarks()["SGD momentum"]}
    monkeypatch.setattr(gpu_check, "benchmarks", lambda: rows)
    small = ([torch.randn(7, 3), torch.randn(5)], [[torch.randn(7, 3), torch.randn(5)]])
    monkeypatch.setattr(gpu_check, "data", lambda check: small)
    report = gpu_check.Report(tmp_path / "gpu_check.md", ["# GPU check"])
    gpu_check.exactness_part(report, "cpu")
    assert report.lines[-1] == "| SGD momentum | 0 of 52 | none | 0 |"


def test_the_fma_count_reads_the_ptx_as_launches_compile_it(monkeypatch):
    """numba-cuda's ``inspect_asm`` compiles the PTX again (another key than a launch's):
    `launched_fmas` asks for it inside `kernels.contraction.uncontracted`, so the count
    is of the kernels as the library compiles them (here a stand-in kernel and NVVM)."""
    from numba.cuda.cudadrv import nvvm

    from bench import gpu_check
    from fastmomentum.kernels import config, contraction, rules
    from fastmomentum.kernels import cuda as kernels

    monkeypatch.setattr(nvvm, "compile_ir", lambda llvmir, **options: "", raising=False)
    monkeypatch.setattr(config, "CUDA_CONTRACTION", False)

    class Kernel:
        overloads = {"signature": None}

        def inspect_asm(self):
            inside = getattr(contraction._compiling, "uncontracted", False)
            return {"signature": "fma.rn.f32" if not inside else "mul.rn.f32"}

    monkeypatch.setattr(
        kernels, "kernels_of", lambda spec: [Kernel()] * (spec is rules.sgd.MOMENTUM)
    )
    assert gpu_check.launched_fmas("SGD") == 0


def test_with_contraction_compiles_the_kernels_as_nvvm_does_by_default(monkeypatch):
    """``--contraction on``: `kernels.config.CUDA_CONTRACTION` set here and, through the
    environment, in the parity workers (which read it as they import the kernels)."""
    from bench import gpu_check
    from fastmomentum.kernels import config

    monkeypatch.setenv(gpu_check.CONTRACTION, "0")  # restored (unset) after the test
    monkeypatch.setattr(config, "CUDA_CONTRACTION", False)
    gpu_check.with_contraction()
    assert os.environ[gpu_check.CONTRACTION] == "1" and config.CUDA_CONTRACTION
    worker = subprocess.run(
        [sys.executable, "-c", "from kernels import config; print(config.CUDA_CONTRACTION)"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert worker.stdout.strip() == "True"


def test_the_gpu_session_script_parses_and_runs_each_part_under_its_limit():
    """bench/gpu_session.sh, the one call a GPU lease gets: valid bash, every part it
    names is a part of gpu_check, and its limits fit the device tool's 600 s per call."""
    import re

    from bench import gpu_check

    script = ROOT / "bench" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    calls = re.findall(r"\bpart (\S+) (\d+) --parts (\S+)", script.read_text())
    assert [name for name, _, _ in calls] == ["no-fma", "fma", "bandwidth", "parity"]
    assert {part for _, _, parts in calls for part in parts.split(",")} <= set(gpu_check.PARTS)
    assert sum(int(limit) for _, limit, _ in calls) <= 600


def test_the_registers_part_steps_every_row_and_the_limited_modes(monkeypatch, tmp_path):
    """Its plumbing (on a GPU the kernels are compiled and report their registers; here a
    stand-in): a step of each benchmark row with CUDA and of each mode given a register
    limit, then a row per kernel launched."""
    import numpy as np

    from bench import gpu_check
    from fastmomentum.kernels import cuda as kernels
    from fastmomentum.kernels import rules
    from fastmomentum.kernels.capturable import capturable

    stepped = []
    monkeypatch.setattr(
        gpu_check, "side", lambda check, *_: stepped.append((check.name, sorted(check.extra)))
    )
    monkeypatch.setattr(gpu_check, "data", lambda check: ([torch.randn(3)], [[torch.randn(3)]]))

    class Compiled:
        regs_per_thread, local_mem_per_thread = 80, 0

    class Dispatcher:
        overloads = {"one signature": Compiled()}

    types = (np.float32, np.float32, np.uint16, np.float32)
    launched = [(capturable(rules.radam.SPEC), (), types, 80, Dispatcher())]
    monkeypatch.setattr(kernels, "launched", lambda: launched)
    report = gpu_check.Report(tmp_path / "gpu_check.md", ["# GPU check"])
    gpu_check.registers_part(report, "cuda")
    rows = [n for n, _ in gpu_check.benchmarks().values() if gpu_check.CAPABILITIES[n].cuda]
    assert len(stepped) == len(rows) + len(gpu_check.LIMITED)
    for name in gpu_check.LIMITED:
        assert (name, ["capturable", "state_dtype"]) in stepped
    assert report.lines[-1] == "| radam_capturable | fp32 / fp32 / bf16 / fp32 | 80 | 80 | 0 |"
