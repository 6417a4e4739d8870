"""What each precision mode's step costs: Adam and SGD momentum timed against torch's
fused step on float32 and on bfloat16 parameters, and against a traffic twin that moves
the mode's own bytes.

Rows: per layout and mode, the bytes a step moves per parameter, the median step time,
and the ratios to torch fused on float32 parameters, to torch fused on bfloat16
parameters, and to the matching twin (`bench/twin.py` kernels over arrays of the mode's
widths; 16-bit arrays as their int16 bits). All cases of a layout take turns in one
run (`measure.time_cases`), and every row gets the report's health check
(`bench/health.py`): as in the report, a layout with an unhealthy row is measured again
with fewer threads (`measure_with_retries`), and a row still unhealthy is marked "!"
with its problems.

    python -m bench.precision_speed [--quick] [--repeats N] [--threads N] [--output DIR]

Writes ``precision_speed.{json,md}`` to ``bench/out/`` (``--output bench/results`` for
the committed run).
"""

import json
import sys
from types import SimpleNamespace

import numpy as np
import torch

import fastmomentum

from . import cli, health, twin
from .layouts import LAYOUTS, numel
from .measure import Case, make_params, median, time_cases

#: mode -> (param dtype, options, bytes per parameter of an Adam step, of an SGD step)
MODES = {
    "torch fused fp32": (torch.float32, {"fused": True}, 28, 20),
    "torch fused bf16": (torch.bfloat16, {"fused": True}, 14, 10),
    "ours fp32": (torch.float32, {}, 28, 20),
    "ours fp32, bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}, 20, 16),
    # codes: 1 byte each read and written; absmax: 16 bytes per 256 parameters, not counted
    "ours fp32, 8-bit state": (torch.float32, {"state_dtype": "int8_blockwise"}, 16, 14),
    "ours bf16": (torch.bfloat16, {}, 14, 10),
    "ours bf16, fp32 master": (torch.bfloat16, {"master_weights": True}, 28, None),
}
OPTIMIZERS = {"Adam": {"lr": 1e-3}, "SGD": {"lr": 1e-3, "momentum": 0.9}}


def optimizer_case(name, mode, shapes):
    dtype, options, adam_bytes, sgd_bytes = MODES[mode]
    moved = adam_bytes if name == "Adam" else sgd_bytes
    if moved is None:
        return None
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
    return Case(optimizer.step, reset, count, len(params), moved * count)


def twin_case(name, mode, count):
    """The traffic twin of ``mode``: its arrays in the widths the mode stores."""
    dtype, options, adam_bytes, sgd_bytes = MODES[mode]
    wide, narrow = np.float32, np.int16  # a 16-bit array is moved as int16
    param = narrow if dtype == torch.bfloat16 else wide
    state = narrow if dtype == torch.bfloat16 or options.get("state_dtype") else wide
    if options.get("state_dtype") == "int8_blockwise":
        state = np.int8
    generator = np.random.default_rng(0)

    def array(kind):
        return (generator.standard_normal(count) * 100).astype(kind)

    if options.get("master_weights"):
        arrays = [array(wide), array(narrow), array(wide), array(wide), array(narrow)]
        kernel = twin.adam_master_twin
    elif name == "Adam":
        arrays = [array(param), array(param), array(state), array(state)]
        kernel = twin.adam_twin
    else:
        arrays = [array(param), array(param), array(state)]
        kernel = twin.sgd_momentum_twin
    start = arrays[0].copy()
    moved = (adam_bytes if name == "Adam" else sgd_bytes) * count
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
    for mode in MODES:
        case = optimizer_case(name, mode, shapes)
        if case is not None:
            cases[mode] = case
            if mode.startswith("ours"):
                twins[mode] = twin_case(name, mode, case.numel)
    times = time_cases({**cases, **{f"twin: {m}": c for m, c in twins.items()}}, repeats)
    conditions = health.GroupConditions(
        median(times["twin: ours fp32"]),
        calibration_s,
        health.cpu_wait_share(before, health.thread_cpu_times()),
    )
    fused32, fused16 = median(times["torch fused fp32"]), median(times["torch fused bf16"])
    rows = []
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


def markdown(rows, threads):
    lines = [
        f"Median step times, {threads} threads (a layout measured again on fewer after an "
        "unhealthy row says so after its name); each layout's cases interleaved in one run.",
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
    rows = []
    for name in OPTIMIZERS:
        for layout in layouts:
            print(f"{name} · {layout} …", file=sys.stderr)
            rows += measure_with_retries(name, layout, args.repeats, args.threads)
    table = markdown(rows, args.threads)
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "precision_speed.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.output / "precision_speed.md").write_text(table)


if __name__ == "__main__":
    main()
