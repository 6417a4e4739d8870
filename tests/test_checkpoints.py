"""Save mid-run, kill the process, resume in a new one: bit-identical to an unbroken run."""

import signal
import subprocess
import sys
from pathlib import Path

import torch

from .checkpoint_run import CASES, DTYPES

ROOT = Path(__file__).resolve().parent.parent


def run(mode, folder):
    return subprocess.run(
        [sys.executable, "-m", "tests.checkpoint_run", mode, str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


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
