"""``python -m bench.memory --quick``: the whole pipeline on tiny models, in a subprocess.

It asserts what the report is made of (every mode, positive sizes), never a speed or
an amount of memory: those are measured by the full run and quoted in bench/NOTES.md.
"""

import json
import subprocess
import sys
from pathlib import Path

import bench
from bench import memory

ROOT = Path(bench.__file__).resolve().parents[1]


def test_quick_run_reports_every_mode(tmp_path):
    command = [sys.executable, "-m", "bench.memory", "--quick", "--threads", "1"]
    run = subprocess.run(
        [*command, "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "memory.json").read_text())
    assert report["quick"] and report["machine"]["cpu"]
    assert set(report["memory"]) == set(memory.MODES)
    for name, row in report["memory"].items():
        if "skipped" in row:  # an option this fastmomentum lacks: said why
            assert "step_in_backward" in row["skipped"], (name, row)
            continue
        (run_,) = row["runs"]
        assert run_["params"] > 0 and run_["tensors"] > 0
        assert isinstance(run_["bytes"]["peak"], int), name  # tiny: may be 0
        assert run_["bytes"]["params"] > 0 and run_["bytes"]["state"] > 0, name
        assert run_["bytes"]["grads_alive"] > 0, name
        assert report["memory_per_param"][name]["model_state"] > 0
    assert set(report["timing"]) == set(memory.MODELS)
    for result in report["timing"].values():
        timed = {**result["times_s"], **result["skipped"]}
        assert set(timed) == set(memory.TIMED_MODES)
        for times in result["times_s"].values():
            assert len(times) == report["rounds"] and min(times) > 0
    table = (tmp_path / "memory.md").read_text()
    assert all(f"| {name} |" in table for name in memory.MODES)
