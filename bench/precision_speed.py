"""What each precision mode's step costs: every mode of issue 20 (float32; bfloat16 and
8-bit state; bfloat16 parameters alone, with master weights, with stochastic rounding,
with Kahan summation, with stochastic rounding and 8-bit state) for Adam and SGD
momentum, and 8-bit state for AdamW and Adagrad, timed against torch's fused step on
float32 and on bfloat16 parameters and against a traffic twin that moves the mode's own
bytes.

Rows: per layout and mode, the bytes a step moves per parameter, the median step time,
and the ratios to torch fused on float32 parameters, to torch fused on bfloat16
parameters, and to the matching twin (`bench/twin.py` kernels over arrays of the mode's
widths; 16-bit arrays as their int16 bits). All cases of a layout take turns in one
run (`measure.time_cases`), and every row gets the report's health check
(`bench/health.py`): as in the report, a layout with an unhealthy row is measured again
with fewer threads (`measure_with_retries`), and a row still unhealthy is marked "!"
with its problems. Each row names the CPU it ran on.

    python -m bench.precision_speed [--quick] [--repeats N] [--threads N] [--output DIR]

Writes ``precision_speed.{json,md}`` to ``bench/out/`` (``--output bench/results`` for
the committed run).
"""

import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

import fastmomentum

from . import cli, health, twin
from .layouts import LAYOUTS, numel
from .measure import Case, make_params, median, time_cases

INT8 = "int8_blockwise"

#: mode -> (param dtype, options)
MODES = {
    "torch fused fp32": (torch.float32, {"fused": True}),
    "torch fused bf16": (torch.bfloat16, {"fused": True}),
    "ours fp32": (torch.float32, {}),
    "ours fp32, bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "ours fp32, 8-bit state": (torch.float32, {"state_dtype": INT8}),
    "ours bf16": (torch.bfloat16, {}),
    "ours bf16, fp32 master": (torch.bfloat16, {"master_weights": True}),
    "ours bf16, stochastic rounding": (torch.bfloat16, {"stochastic_rounding": True}),
    "ours bf16, Kahan": (torch.bfloat16, {"kahan_sum": True}),
    "ours bf16, stochastic rounding, 8-bit state": (
        torch.bfloat16,
        {"stochastic_rounding": True, "state_dtype": INT8},
    ),
}
#: The modes of the optimizers that get only the 8-bit rows (and the rows they need).
INT8_MODES = ("torch fused fp32", "torch fused bf16", "ours fp32", "ours fp32, 8-bit state")

#: optimizer -> (hyperparameters, state arrays per parameter, modes)
OPTIMIZER_CASES = {
    "Adam": ({"lr": 1e-3}, 2, tuple(MODES)),
    "SGD": ({"lr": 1e-3, "momentum": 0.9}, 1, tuple(MODES)),
    "AdamW": ({"lr": 1e-3}, 2, INT8_MODES),
    "Adagrad": ({"lr": 1e-2}, 1, INT8_MODES),
}
OPTIMIZERS = {name: options for name, (options, _, _) in OPTIMIZER_CASES.items()}


def bytes_moved(name, mode):
    """Bytes a step of optimizer ``name`` in ``mode`` reads and writes per parameter: the
    param read and written (with master weights: the float32 copy read and written and
    the param written), the gradient read, each state array read and written (8-bit
    codes: 1 byte; their absmax, 8 bytes per 256 parameters, is not counted), and a
    Kahan compensation read and written."""
    dtype, options = MODES[mode]
    width = torch.finfo(dtype).bits // 8
    state = options.get("state_dtype")
    if state == INT8:
        state_width = 1
    elif options.get("master_weights"):
        state_width = 4
    else:
        state_width = torch.finfo(state or dtype).bits // 8
    param = 4 + 4 + width if options.get("master_weights") else 2 * width
    kahan = 2 * width if options.get("kahan_sum") else 0
    return param + width + kahan + 2 * state_width * OPTIMIZER_CASES[name][1]


def optimizer_case(name, mode, shapes):
    dtype, options = MODES[mode]
    library = torch.optim if mode.startswith("torch") else fastmomentum
    params = make_params(shapes, dtype)
    optimizer = getattr(library, name)(params, **OPTIMIZERS[name], **options)
    start = [p.detach().clone() for p in params]

    @torch.no_grad()
    def reset():
        for param, value in zip(params, start):
            param.copy_(value)

    if options.get("master_weights"):
        # A reset writes the params, which (rightly) makes the next step take the master
        # copy from them again: a pass more than training does. These steps run from
        # where the last one left off instead (lr 1e-3: nothing drifts far in a run).
        def reset():
            pass

    count = numel(shapes)
    return Case(optimizer.step, reset, count, len(params), bytes_moved(name, mode) * count)


def twin_case(name, mode, count):
    """The traffic twin of ``mode``: its arrays in the widths the mode stores."""
    dtype, options = MODES[mode]
    wide, narrow = np.float32, np.int16  # a 16-bit array is moved as int16
    param = narrow if dtype == torch.bfloat16 else wide
    state = narrow if dtype == torch.bfloat16 or options.get("state_dtype") else wide
    if options.get("state_dtype") == INT8:
        state = np.int8
    generator = np.random.default_rng(0)

    def array(kind):
        return (generator.standard_normal(count) * 100).astype(kind)

    moments = OPTIMIZER_CASES[name][1]
    if options.get("master_weights"):  # master copy, grad, float32 state, param
        arrays = [array(wide), array(narrow), *(array(wide) for _ in range(moments))]
        arrays.append(array(narrow))
        kernel = twin.adam_master_twin if moments == 2 else twin.sgd_momentum_master_twin
    elif options.get("kahan_sum"):  # param, grad, compensation, state
        arrays = [array(param), array(param), array(param)]
        arrays += [array(state) for _ in range(moments)]
        # SGD's four arrays (one read only) move what Adam's twin moves
        kernel = twin.adam_kahan_twin if moments == 2 else twin.adam_twin
    else:
        arrays = [array(param), array(param), *(array(state) for _ in range(moments))]
        kernel = twin.adam_twin if moments == 2 else twin.sgd_momentum_twin
    start = arrays[0].copy()
    moved = bytes_moved(name, mode) * count
    return Case(lambda: kernel(*arrays), lambda: np.copyto(arrays[0], start), count, 1, moved)


def calibrated_twin_s(name, count, repeats=5):
    """The fp32 twin's best step on one thread (`health`: what its bytes cost with no
    worker thread to wait for)."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        case = twin_case(name, "ours fp32", count)
        return min(time_cases({"twin": case}, repeats)["twin"])
    finally:
        numba.set_num_threads(threads)


def measure(name, layout, repeats):
    """Rows of every mode on one layout, each with its `health` verdict: the fp32
    twin against its one-thread calibration, our threads' wait for a CPU, the spread."""
    shapes = LAYOUTS[layout]()
    calibration_s = calibrated_twin_s(name, numel(shapes))
    before = health.thread_cpu_times()
    cases, twins = {}, {}
    for mode in OPTIMIZER_CASES[name][2]:
        cases[mode] = optimizer_case(name, mode, shapes)
        if mode.startswith("ours"):
            twins[mode] = twin_case(name, mode, cases[mode].numel)
    times = time_cases({**cases, **{f"twin: {m}": c for m, c in twins.items()}}, repeats)
    conditions = health.GroupConditions(
        median(times["twin: ours fp32"]),
        calibration_s,
        health.cpu_wait_share(before, health.thread_cpu_times()),
    )
    fused32, fused16 = median(times["torch fused fp32"]), median(times["torch fused bf16"])
    rows, cpu = [], cli.cpu_model()
    for mode, case in cases.items():
        seconds = median(times[mode])
        twin_seconds = median(times[f"twin: {mode}"]) if mode in twins else None
        rows.append(
            {
                "optimizer": name,
                "layout": layout,
                "mode": mode,
                "bytes_per_param": case.bytes_per_step // case.numel,
                "median_s": seconds,
                "vs_fused_fp32": seconds / fused32,
                "vs_fused_bf16": seconds / fused16,
                "vs_twin": seconds / twin_seconds if twin_seconds else None,
                "twin_s": twin_seconds,
                "times_s": times[mode],
                "cpu": cpu,
            }
        )
        rows[-1]["health"] = health.assess(rows[-1], conditions).to_json()
    return rows


def measure_with_retries(name, layout, repeats, threads):
    """`measure` on ``threads`` threads, again on fewer while a row is unhealthy
    (`health.thread_counts_to_try`); the attempt `health.pick_attempt` keeps, each row
    with its ``threads`` and every attempt's thread count and unhealthy rows."""
    counts = health.thread_counts_to_try(threads)
    attempts = []
    for count in counts:
        _set_threads(count)
        attempts.append(measure(name, layout, repeats))
        if all(row["health"]["ok"] for row in attempts[-1]):
            break
    _set_threads(threads)
    verdicts = [[SimpleNamespace(ok=row["health"]["ok"]) for row in rows] for rows in attempts]
    kept = health.pick_attempt(verdicts)
    record = [
        {"threads": count, "unhealthy_rows": sum(not v.ok for v in attempt), "kept": i == kept}
        for i, (count, attempt) in enumerate(zip(counts, verdicts))
    ]
    for row in attempts[kept]:
        row["threads"], row["attempts"] = counts[kept], record
    return attempts[kept]


def _set_threads(threads):
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)


def markdown(rows, threads, machine=None):
    """The table of ``rows``, under a line naming the CPU they ran on (``machine``: that
    line's start, else the rows' ``cpu``)."""
    if machine is None:
        machine = rows[0].get("cpu", "CPU not recorded") if rows else "no rows"
    lines = [
        f"{machine}. Median step times, {threads} threads (a layout measured again on "
        "fewer after an unhealthy row says so after its name); each layout's cases "
        "interleaved in one run.",
        "",
        "| optimizer | layout | mode | bytes/param | ms "
        "| × fused fp32 | × fused bf16 | × its twin | ! |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        twin_ratio = f"{row['vs_twin']:.2f}" if row["vs_twin"] else "-"
        verdict = row["health"]
        mark = "" if verdict["ok"] else "! " + "; ".join(verdict["problems"])
        layout = row["layout"]
        if row.get("threads", threads) != threads:
            layout += f" ({row['threads']} thr)"
        lines.append(
            f"| {row['optimizer']} | {layout} | {row['mode']} | {row['bytes_per_param']} "
            f"| {row['median_s'] * 1e3:.2f} | {row['vs_fused_fp32']:.2f} "
            f"| {row['vs_fused_bf16']:.2f} | {twin_ratio} | {mark} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = cli.parser("bench.precision_speed", __doc__)
    parser.add_argument("--quick", action="store_true", help="the 16M tensor only")
    parser.add_argument("--repeats", type=cli.positive_int, default=11, help="timed steps")
    cli.add_threads(parser, torch.get_num_threads())
    cli.add_output(parser, "precision_speed.{json,md}")
    args = parser.parse_args(argv)
    _set_threads(args.threads)
    layouts = ["16M tensor"] if args.quick else ["16M tensor", "ResNet-50", "GPT-2 x4 blocks"]
    load_before, rows = os.getloadavg()[0], []
    for name in OPTIMIZERS:
        for layout in layouts:
            print(f"{name} · {layout} …", file=sys.stderr)
            rows += measure_with_retries(name, layout, args.repeats, args.threads)
    machine = (
        f"{cli.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    table = markdown(rows, args.threads, machine)
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "precision_speed.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.output / "precision_speed.md").write_text(table)


if __name__ == "__main__":
    main()
