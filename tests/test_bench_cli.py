"""The benchmark commands: a health check that flags loaded-machine timings, and argument
parsers that never start a run (or overwrite the committed results) by mistake."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import fastmomentum
from bench import health, report

ROOT = Path(bench.__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ENTRY_POINTS = [
    "bench",
    "bench.convergence",
    "bench.training",
    "bench.per_tensor",
    "bench.demo",
    "bench.gpu_check",
    "bench.gpu_static",
    "bench.precision",
    "bench.precision_speed",
    "bench.memory",
    "bench.accuracy",
]


def row(times_s, provider="fastmomentum"):
    """A result row as the report makes them, reduced to what the health check reads."""
    return {"provider": provider, "times_s": times_s}


def quiet(twin_s=5e-6, calibration_s=3e-6):
    """A 2^14-element group on an idle 2-core machine: the 2-thread twin beats one thread."""
    return health.GroupConditions(twin_s=twin_s, calibration_s=calibration_s, cpu_wait=0.01)


def test_a_sane_measurement_is_healthy():
    times = [4.8e-6, 4.9e-6, 5e-6, 5e-6, 5.1e-6, 5.3e-6, 6e-6]
    verdict = health.assess(row(times), quiet())
    assert verdict.ok, verdict.problems
    assert verdict.twin_vs_calibration < 1
    assert health.assess(row(times), health.GroupConditions(5e-6, 3e-6, None)).ok


def test_a_twin_40_times_slower_than_its_calibration_is_flagged():
    slow = 40 * (3e-6 + health.LAUNCH_ALLOWANCE_S)  # ≈1 ms for 2^14 elements
    for times in ([slow] * 11, [1e-5] * 11):  # the twin's verdict covers its whole group
        verdict = health.assess(row(times), quiet(twin_s=slow))
        assert not verdict.ok
        assert verdict.twin_vs_calibration == pytest.approx(40)
        assert verdict.problems[0] == "twin 40x slower than on one thread"


def test_threads_waiting_for_a_cpu_are_flagged_when_the_twin_hides_them():
    # ResNet-50 beside other work: the twin looks fine, torch fused read 220 ms, not 30
    loaded = health.GroupConditions(twin_s=30e-3, calibration_s=25e-3, cpu_wait=0.45)
    verdict = health.assess(row([220e-3] * 11, "torch fused"), loaded)
    assert not verdict.twin_too_slow
    assert verdict.problems == ["threads waited for a CPU 45% of the time"]


def test_cpu_wait_share_counts_every_thread_that_wanted_a_cpu():
    before = {"1": (100, 0), "2": (50, 10)}
    after = {"1": (400, 100), "2": (50, 10), "3": (100, 200)}  # thread 3 started meanwhile
    assert health.cpu_wait_share(before, after) == pytest.approx(300 / 700)
    assert health.cpu_wait_share({}, {}) is None


def test_a_huge_spread_between_repeats_is_flagged():
    times = [1e-3] * 7 + [12e-3] * 4  # a third of the steps stalled for a scheduler slice
    verdict = health.assess(row(times), quiet(twin_s=1e-3, calibration_s=1e-3))
    assert not verdict.ok
    assert verdict.too_spread
    assert any("spread" in problem for problem in verdict.problems)


def test_mostly_slow_repeats_are_flagged_even_with_an_ordinary_spread():
    times = [121e-3] + [300e-3 + i * 5e-3 for i in range(10)]  # torch fused, loaded machine
    verdict = health.assess(row(times), quiet(twin_s=20e-3, calibration_s=20e-3))
    assert not verdict.too_spread
    assert verdict.mostly_slow and not verdict.ok


def test_retries_fall_back_to_one_thread_and_keep_the_first_healthy_attempt():
    assert health.thread_counts_to_try(2) == [2, 1]
    assert health.thread_counts_to_try(16) == [16, 8, 1]
    assert health.thread_counts_to_try(1) == [1, 1]
    sick, well = health.Health(40.0, 0.0, 0.1, 1.0), health.Health(0.5, 0.0, 0.1, 1.0)
    assert health.pick_attempt([[sick, sick], [well, well]]) == 1
    assert health.pick_attempt([[sick, well], [sick, sick]]) == 0


def test_precision_rows_are_measured_again_on_fewer_threads_while_unhealthy(monkeypatch):
    from bench import precision_speed

    threads_seen = []

    def measure(name, layout, repeats):  # unhealthy on 2 threads, healthy on 1
        import numba

        threads_seen.append(numba.get_num_threads())
        ok = threads_seen[-1] == 1
        return [
            {"optimizer": name, "layout": layout, "mode": "ours fp32", "bytes_per_param": 28,
             "median_s": 1e-3, "vs_fused_fp32": 0.9, "vs_fused_bf16": 1.2, "vs_twin": 1.1,
             "health": {"ok": ok, "problems": [] if ok else ["threads waited"]}}
        ]  # fmt: skip

    monkeypatch.setattr(precision_speed, "measure", measure)
    rows = precision_speed.measure_with_retries("Adam", "16M tensor", 3, threads=2)
    assert threads_seen == [2, 1]
    assert rows[0]["threads"] == 1 and [a["kept"] for a in rows[0]["attempts"]] == [False, True]
    assert "16M tensor (1 thr)" in precision_speed.markdown(rows, 2)


def test_the_table_and_the_json_mark_an_unreliable_group():
    verdict = health.Health(40.0, 0.0, 0.1, 1.0)
    rows = [
        {
            "optimizer": "SGD momentum",
            "layout": "2^14 tensor",
            "dtype": "float32",
            "provider": provider,
            "median_s": 12e-3,
            "gb_per_s": 0.0,
            "vs_torch_fused": 1.0,
            "vs_twin": 1.0,
            "threads": 1,
            "health": verdict.to_json(),
        }
        for provider in ("torch fused", report.TWIN)
    ]
    name = report.group_name(rows[0])
    retries = {
        name: [
            {"threads": 2, "unhealthy_rows": 2, "problems": verdict.problems, "kept": False},
            {"threads": 1, "unhealthy_rows": 2, "problems": verdict.problems, "kept": True},
        ]
    }
    summary = report.health_summary(rows, retries, load_before=0.0)
    assert summary["ok"] is False
    assert summary["unreliable_groups"] == [name]
    assert rows[0]["health"]["ok"] is False
    assert all(line.endswith("!") for line in report.format_table(rows).splitlines()[1:])
    notes = "\n".join(report.health_notes(summary))
    assert "2 threads: twin 40x slower than on one thread" in notes
    assert "1 thread: twin 40x slower than on one thread (kept)" in notes


def results_state():
    return {path.name: path.stat().st_mtime_ns for path in RESULTS.iterdir()}


def test_help_prints_help_and_runs_nothing():
    before = results_state()
    runs = {
        module: subprocess.Popen(
            [sys.executable, "-m", module, "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in ENTRY_POINTS
    }
    try:
        for module, run in runs.items():
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, f"{module}: {err}"
            assert out.startswith(f"usage: python -m {module}"), f"{module}: {out[:200]}"
    finally:  # none outlives the test, whatever failed or timed out
        for run in runs.values():
            run.kill()
            run.wait()
    assert results_state() == before


@pytest.mark.parametrize("module", ["bench.convergence", "bench.training"])
def test_an_unknown_flag_is_an_error(module):
    before = results_state()
    run = subprocess.run(
        [sys.executable, "-m", module, "--no-such-flag"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stdout[-500:]
    assert "unrecognized arguments: --no-such-flag" in run.stderr
    assert results_state() == before


def test_runs_write_to_an_untracked_folder_by_default():
    from bench import cli

    assert cli.OUT != cli.RESULTS
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(cli.OUT / "quick.json")], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, "bench/out/ is not ignored by git"


def test_one_optimizers_sweep_has_its_groups_only_and_lamb_has_its_peer():
    from bench import providers

    plan = report.sweep_plan(False, ["LAMB"])
    assert {group[0] for group in plan} == {"LAMB"}
    assert len(plan) == len(report.sweep_plan(False)) // len(providers.OPTIMIZERS)
    params = [torch.nn.Parameter(torch.randn(3))]
    assert isinstance(providers.our_adam("LAMB", params, {"lr": 1e-3}), fastmomentum.Adam)
    assert providers.our_adam("Adam", params, {"lr": 1e-3}) is None
    assert providers.torch_foreach("LAMB", params, {"lr": 1e-3}) is None


def test_an_unknown_optimizer_is_an_error_naming_the_choices():
    before = results_state()
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--optimizer", "Nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "unknown --optimizer ['Nope']" in run.stderr and "LAMB" in run.stderr
    assert results_state() == before


@pytest.mark.parametrize("name", ["SGD momentum", "Adam", "LAMB"])
def test_each_step_has_a_twin_moving_its_arrays(name):
    """A twin per count of arrays moved (providers.arrays_moved): its case is built, and
    its kernel writes the parameters and keeps them finite over many steps."""
    from bench import measure, providers

    case = measure.twin_case(name, 64, torch.float32)
    assert case.bytes_per_step == providers.arrays_moved(name) * 64 * 4
    kernel, count = measure._TWINS[providers.arrays_moved(name)]
    arrays = [np.random.default_rng(k).standard_normal(64) for k in range(count)]
    start = arrays[0].copy()
    for _ in range(101):  # odd: x ← g − x returns to its start every second step
        kernel(*arrays)
    assert np.isfinite(arrays[0]).all() and not np.array_equal(arrays[0], start)


def test_a_peer_that_is_not_installed_is_named_with_its_remedy_not_left_blank(monkeypatch):
    """Without deepspeed the DeepSpeedCPUAdam column reads "not run" where it has a step
    (Adam, AdamW in float32), and a note says why and how to install it."""
    from bench import providers

    for module in ("deepspeed", "deepspeed.ops", "deepspeed.ops.adam"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, as when not installed
    providers.deepspeed_status.cache_clear()
    try:
        ok, why = providers.deepspeed_status()
    finally:
        providers.deepspeed_status.cache_clear()
    assert not ok and "deepspeed is not installed" in why

    def result(optimizer, dtype, provider):
        return {"optimizer": optimizer, "layout": "2^14 tensor", "dtype": dtype,
                "provider": provider, "median_s": 1e-3, "vs_torch_fused": 1.0, "vs_twin": 1.0,
                "threads": 2, "health": {"ok": True}}  # fmt: skip

    groups = [("Adam", "float32"), ("SGD momentum", "float32"), ("AdamW", "float64")]
    rows = [
        result(optimizer, dtype, provider)
        for optimizer, dtype in groups
        for provider in ("fastmomentum", "torch fused", report.TWIN)
    ]
    table = report.markdown_summary(rows, 2, {"DeepSpeedCPUAdam": why}).splitlines()
    deepspeed = table[0].split("|").index(" DeepSpeedCPUAdam ms ")
    assert [line.split("|")[deepspeed].strip() for line in table[2:5]] == ["not run", "-", "-"]
    (note,) = report.peer_notes({"DeepSpeedCPUAdam": why})
    assert note.startswith("! DeepSpeedCPUAdam not measured: deepspeed is not installed")
    assert providers.DEEPSPEED_INSTALL in note and "[bench]" in note

    written = report.markdown_report(  # the markdown file: the machine, then the note
        {
            "machine": {"cpu": "AMD EPYC", "cores": 2},
            "versions": {"torch": "2.13.0+cpu", "numba": "0.68.1"},
            "threads": {"torch": 2},
            "timestamp": "2026-12-03T07:17:08+00:00",
            "health": report.health_summary(rows, {}, load_before=0.5),
            "missing_peers": {"DeepSpeedCPUAdam": why},
            "results": rows,
            "precision_modes": [],
        },
        2,
    )
    assert written.startswith("AMD EPYC, 2 cores, 2 threads; torch 2.13.0+cpu, numba 0.68.1;")
    assert f"\n{note}\n" in written and "| not run |" in written


def test_deepspeed_has_a_table_of_ratios_where_it_was_measured():
    def result(provider, median_s):
        return {"optimizer": "AdamW", "layout": "ResNet-50", "dtype": "float32",
                "provider": provider, "median_s": median_s, "vs_torch_fused": 1.0,
                "vs_twin": 1.0, "threads": 2, "health": {"ok": True}}  # fmt: skip

    rows = [
        result("fastmomentum", 16e-3),
        result("fastmomentum flat", 15e-3),
        result("torch fused", 18e-3),
        result("DeepSpeedCPUAdam", 20e-3),
        result(report.TWIN, 15e-3),
    ]
    table = report.markdown_summary(rows, 2)
    assert "| 20.000 |" in table.splitlines()[2] and "not run" not in table
    ratios = "| 16.000 | 15.000 | 20.000 | 18.000 | 0.80 | 0.75 | 1.11 |"  # ours/DS, DS/fused
    assert f"| AdamW | ResNet-50 | float32 {ratios}" in table
