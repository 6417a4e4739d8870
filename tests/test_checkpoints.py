"""Save mid-run, kill the process, resume in a new one: bit-identical to an unbroken run."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .checkpoint_run import CASES, DTYPES

ROOT = Path(__file__).resolve().parent.parent
#: Seconds each run may take. Measured on the 2-core machine: 5-8 s a run with a warm Numba
#: cache, 5-18 s with an empty one (kernels compiled) at a load average of 7, 20-30 s at a
#: load average of 10; a loaded machine runs 2-9x slower than an idle one.
DEADLINE = 300


def run(mode, folder):
    """``python -m tests.checkpoint_run MODE FOLDER``; killed, and the test failed, at the
    deadline (``subprocess.run`` kills the child when its timeout expires)."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "tests.checkpoint_run", mode, str(folder)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr or b""  # bytes, even with text=True
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        pytest.fail(f"checkpoint_run {mode}: still running after {DEADLINE} s: killed\n{stderr}")


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    first = run("first", tmp_path)
    assert first.returncode == -signal.SIGKILL, first.stderr
    for mode in ("second", "whole"):
        result = run(mode, tmp_path)
        assert result.returncode == 0, result.stderr
    for case in CASES:
        for dtype in DTYPES:
            resumed = torch.load(tmp_path / f"{case}-{dtype}.second")
            whole = torch.load(tmp_path / f"{case}-{dtype}.whole")
            for p, q in zip(resumed, whole):
                assert torch.equal(p, q), f"{case} {dtype}: resumed run differs"
