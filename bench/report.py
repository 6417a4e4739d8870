"""The report command: a sweep over optimizers, layouts and providers, as a table, JSON and PNG.

    python -m bench                            # full sweep, a few minutes on 2 cores
    python -m bench --quick                    # about a minute
    python -m bench --output bench/results     # replace the committed results
    python -m bench --optimizer LAMB --output bench/results/lamb   # one optimizer's groups

Every group (optimizer × layout) times all providers and the traffic twin in one
interleaved run; the table shows the median step time, the bandwidth it implies, and
the ratios to torch's fused step and to the twin (the memory limit). Every row gets a
health check (bench/health.py): a group whose twin is far slower than the same twin on
one thread, whose threads waited long for a CPU, or whose repeats spread widely, is
measured again with fewer threads; what stays unhealthy is marked "!" in the table and
``"ok": false`` in the JSON. Output goes to bench/out/ unless ``--output`` says
otherwise.
"""

import datetime
import json
import os
import platform
import sys
from pathlib import Path

from . import cli, health

TWIN = "traffic twin"
PEER = "our Adam"  # LAMB's peer (providers.our_adam)


def sweep_plan(quick, only=None):
    """(optimizer, layout name, shapes, dtype) groups of the sweep (of the optimizers
    ``only``, when given)."""
    import torch

    from .layouts import LAYOUTS, single

    optimizers = ["SGD momentum", "Adam"] if quick else list(_optimizer_names())
    if only:
        optimizers = list(only)
    exponents = [14, 18, 22] if quick else [12, 14, 16, 18, 20, 22, 24]
    models = (
        ["ResNet-50", "MLP 784-256-10"]
        if quick
        else ["ResNet-50", "GPT-2 x4 blocks", "MLP 784-256-10"]
    )
    plan = []
    for optimizer in optimizers:
        shaped = _matrices if _matrices_only(optimizer) else (lambda shapes: shapes)
        for exponent in exponents:
            tensor = shaped(single(2**exponent))
            plan.append((optimizer, f"2^{exponent} tensor", tensor, torch.float32))
        for layout in models:
            plan.append((optimizer, layout, shaped(LAYOUTS[layout]()), torch.float32))
        if not quick:
            plan.append((optimizer, "2^22 tensor", shaped(single(2**22)), torch.float64))
    return plan


def _matrices_only(benchmark):
    """Whether the benchmark's optimizer steps 2-D parameters only (Muon)."""
    import fastmomentum

    return getattr(getattr(fastmomentum, _optimizer_names()[benchmark][0]), "matrices_only", False)


def _matrices(shapes):
    """A layout's 2-D shapes (Muon's), a single tensor of 2ᵏ elements as a 2^⌊k/2⌋ × 2^⌈k/2⌉
    matrix."""
    if len(shapes) == 1 and len(shapes[0]) == 1:
        exponent = shapes[0][0].bit_length() - 1
        return [(2 ** (exponent // 2), 2 ** (exponent - exponent // 2))]
    return [shape for shape in shapes if len(shape) == 2]


def _optimizer_names():
    from .providers import OPTIMIZERS

    return OPTIMIZERS


def run_group(optimizer, layout, shapes, dtype, providers, repeats):
    """Time every provider (and the twin) on one group; returns result rows."""
    from .measure import median, optimizer_case, time_cases, twin_case

    cases = {}
    for provider in providers:
        case = optimizer_case(optimizer, provider, shapes, dtype)
        if case is not None:
            cases[provider] = case
    any_case = next(iter(cases.values()))
    cases[TWIN] = twin_case(optimizer, any_case.numel, dtype)
    times = time_cases(cases, repeats)
    fused = median(times["torch fused"]) if "torch fused" in times else None
    adam = median(times[PEER]) if PEER in times else None
    twin = median(times[TWIN])
    rows = []
    for provider, case in cases.items():
        seconds = median(times[provider])
        rows.append(
            {
                "optimizer": optimizer,
                "layout": layout,
                "dtype": str(dtype).removeprefix("torch."),
                "provider": provider,
                "numel": case.numel,
                "tensors": case.tensors,
                "bytes_per_step": case.bytes_per_step,
                "median_s": seconds,
                "times_s": times[provider],
                "gb_per_s": case.bytes_per_step / seconds / 1e9,
                "vs_torch_fused": seconds / fused if fused else None,
                "vs_our_adam": seconds / adam if adam else None,
                "vs_twin": seconds / twin,
            }
        )
    return rows


def set_threads(threads):
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)


def calibrate_twin(optimizer, shapes, dtype, repeats=5):
    """Seconds of the group's traffic twin on one thread, best of ``repeats`` steps: what
    its bytes cost with no worker thread to wait for (see bench/health.py)."""
    from .layouts import numel
    from .measure import time_cases, twin_case

    set_threads(1)
    case = twin_case(optimizer, numel(shapes), dtype)
    return min(time_cases({TWIN: case}, repeats)[TWIN])


def run_group_watched(group, providers, repeats, threads, calibration_s):
    """`run_group` on ``threads`` threads; returns its rows and `health.GroupConditions`."""
    set_threads(threads)
    before = health.thread_cpu_times()
    rows = run_group(*group, providers, repeats)
    cpu_wait = health.cpu_wait_share(before, health.thread_cpu_times())
    twin = next(row for row in rows if row["provider"] == TWIN)
    return rows, health.GroupConditions(twin["median_s"], calibration_s, cpu_wait)


def measure_group(group, providers, repeats, threads, announce):
    """`run_group` after the twin's calibration, measured again with fewer threads while
    a row looks unhealthy (`health.thread_counts_to_try`).

    Returns the rows of the attempt `health.pick_attempt` keeps, each with its
    ``threads`` and ``health``, and a record of each attempt: threads, unhealthy rows,
    problems. ``announce(threads)`` is called before each attempt after the first.
    """
    calibration_s = calibrate_twin(group[0], group[2], group[3])
    thread_counts = health.thread_counts_to_try(threads)
    attempts, verdicts = [], []
    for attempt_threads in thread_counts:
        if attempts:
            announce(attempt_threads)
        rows, conditions = run_group_watched(
            group, providers, repeats, attempt_threads, calibration_s
        )
        attempts.append(rows)
        verdicts.append([health.assess(row, conditions) for row in rows])
        if all(verdict.ok for verdict in verdicts[-1]):
            break
    set_threads(threads)
    kept = health.pick_attempt(verdicts)
    for row, verdict in zip(attempts[kept], verdicts[kept]):
        row["threads"] = thread_counts[kept]
        row["health"] = {**verdict.to_json(), "twin_calibration_s": calibration_s}
    records = [
        {
            "threads": thread_counts[index],
            "unhealthy_rows": sum(not verdict.ok for verdict in group_verdicts),
            "problems": health.group_problems(rows, group_verdicts),
            "kept": index == kept,
        }
        for index, (rows, group_verdicts) in enumerate(zip(attempts, verdicts))
    ]
    return attempts[kept], records


def group_name(row):
    return f"{row['optimizer']} · {row['layout']} · {row['dtype']}"


def health_summary(rows, retries, load_before):
    """The report's top-level ``health``: the limits, the groups measured more than once
    (``retries``: group name -> attempt records), the groups still unhealthy, and the
    machine's load average before the run (``load_before``) and now."""
    unhealthy = [row for row in rows if not row["health"]["ok"]]
    busy = load_before > os.cpu_count()
    return {
        "ok": not unhealthy and not busy,
        "load_average_1min": {"before": load_before, "after": _load_average()},
        "busy_before": busy,
        "calibration": "each group's traffic twin on 1 thread, best of 5 steps",
        "limits": health.limits(),
        "groups": len({group_name(row) for row in rows}),
        "unreliable_rows": len(unhealthy),
        "unreliable_groups": list(dict.fromkeys(group_name(row) for row in unhealthy)),
        "retried": [{"group": name, "attempts": records} for name, records in retries.items()],
    }


def peer_notes(missing):
    """A line for each peer that was not measured (name -> why), with how to add it."""
    from .providers import DEEPSPEED_INSTALL

    install = {"DeepSpeedCPUAdam": DEEPSPEED_INSTALL}
    return [
        f"! {name} not measured: {why}."
        + (f" To compare against it: {install[name]}." if name in install else "")
        for name, why in missing.items()
    ]


def health_notes(summary):
    """Footnote lines for the table: the rule, each retry, each group still unreliable."""
    limits = summary["limits"]
    lines = [
        f"Health: a row is unreliable (!) when its group's traffic twin runs over "
        f"{limits['twin_vs_calibration']:g}x slower than on one thread, or our threads "
        f"waited for a CPU over {limits['cpu_wait']:.0%} of the time, or its repeats' "
        f"interquartile range exceeds {limits['spread']:g}x their median, or their median "
        f"{limits['median_vs_best']:g}x their best. Such groups are measured again with "
        f"fewer threads; thr (or a count after the layout) is the thread count kept."
    ]
    if summary["busy_before"]:
        lines.append(
            f"! The machine was busy before the run (load average "
            f"{summary['load_average_1min']['before']:.1f} on {os.cpu_count()} cores): "
            "expect every timing to be inflated, flagged or not."
        )
    unreliable = set(summary["unreliable_groups"])
    for retry in summary["retried"]:
        attempts = "; ".join(_attempt_text(attempt) for attempt in retry["attempts"])
        mark = "! " if retry["group"] in unreliable else ""
        lines.append(f"{mark}{retry['group']}: {attempts}.")
    if unreliable:
        lines.append(
            f"! {summary['unreliable_rows']} rows unreliable: the machine looks loaded; "
            "rerun on a quiet machine (or with --threads 1) before quoting them."
        )
    return lines


def _warning(summary):
    reasons = []
    if summary["unreliable_rows"]:
        reasons.append(f"{summary['unreliable_rows']} measurements unreliable (marked !)")
    if summary["busy_before"]:
        reasons.append("the machine was busy before the run")
    return "; ".join(reasons)


def _load_average():
    return round(os.getloadavg()[0], 2)


def _attempt_text(attempt):
    verdict = "; ".join(attempt["problems"]) or "healthy"
    kept = " (kept)" if attempt["kept"] else ""
    return f"{_threads_text(attempt['threads'])}: {verdict}{kept}"


def _layout_label(layout, row, threads, by_provider):
    """A table's layout cell: the thread count ``row`` was measured on where it is not
    the run's, and "!" after a group with an unhealthy row."""
    if row["threads"] != threads:
        layout += f" ({_threads_text(row['threads'])})"
    if not all(entry["health"]["ok"] for entry in by_provider.values()):
        layout += " !"
    return layout


def _threads_text(threads):
    return f"{threads} thread" + ("s" if threads > 1 else "")


def machine_facts(threads):
    import numba
    import numpy
    import torch

    import fastmomentum

    cpu = cli.cpu_model()
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": numpy.__version__,
        "fastmomentum": fastmomentum.__version__,
    }
    try:
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
    except Exception:
        pass
    return {
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        },
        "versions": versions,
        "threads": {
            "torch": torch.get_num_threads(),
            "numba": numba.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "numba_threading_layer": numba.threading_layer(),
        # Huge pages decide memory-bound steps (bench/NOTES.md, entry 11).
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _read(path):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def format_table(rows):
    """A plain-text table: one block per (optimizer, layout), providers beside the twin."""
    lines = [
        f"{'optimizer':13} {'layout':16} {'dtype':7} {'provider':18} {'median ms':>10} "
        f"{'GB/s':>6} {'x fused':>8} {'x twin':>7} {'thr':>3} !"
    ]
    previous = None
    for row in rows:
        group = (row["optimizer"], row["layout"], row["dtype"])
        if group != previous and previous is not None:
            lines.append("")
        previous = group
        fused = f"{row['vs_torch_fused']:.2f}" if row["vs_torch_fused"] else "-"
        lines.append(
            f"{row['optimizer']:13} {row['layout']:16} {row['dtype']:7} {row['provider']:18} "
            f"{row['median_s'] * 1e3:10.3f} {row['gb_per_s']:6.1f} {fused:>8} "
            f"{row['vs_twin']:7.2f} {row['threads']:3} {_mark(row)}"
        )
    return "\n".join(lines)


def _mark(row):
    return "" if row["health"]["ok"] else "!"


def markdown_summary(rows, threads, missing=None):
    """One line per (optimizer, layout, dtype): ours (default mode and flat gradients)
    beside torch fused, DeepSpeed and the twin; "!" after an unreliable group's layout,
    and its thread count when it is not ``threads``. A peer named in ``missing`` (name ->
    why it was not measured) reads "not run" where it has a step, never a silent "-"."""
    from .providers import OPTIMIZERS, deepspeed_applies

    missing = missing or {}
    groups = {}
    for row in rows:
        key = (row["optimizer"], row["layout"], row["dtype"])
        groups.setdefault(key, {})[row["provider"]] = row
    lines = [
        "| optimizer | layout | dtype | ours ms | ours flat ms | torch fused ms "
        "| DeepSpeedCPUAdam ms | twin ms | ours / fused | flat / fused | ours / twin |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (optimizer, layout, dtype), by_provider in groups.items():

        def ms(provider, by_provider=by_provider):
            row = by_provider.get(provider)
            return f"{row['median_s'] * 1e3:.3f}" if row else "-"

        deepspeed = ms("DeepSpeedCPUAdam")
        if "DeepSpeedCPUAdam" in missing and deepspeed_applies(OPTIMIZERS[optimizer][0], dtype):
            deepspeed = "not run"

        def ratio(provider, key, by_provider=by_provider):
            row = by_provider.get(provider)
            return f"{row[key]:.2f}" if row and row[key] else "-"

        layout = _layout_label(layout, next(iter(by_provider.values())), threads, by_provider)
        lines.append(
            f"| {optimizer} | {layout} | {dtype} | {ms('fastmomentum')} "
            f"| {ms('fastmomentum flat')} | {ms('torch fused')} | {deepspeed} "
            f"| {ms(TWIN)} | {ratio('fastmomentum', 'vs_torch_fused')} "
            f"| {ratio('fastmomentum flat', 'vs_torch_fused')} "
            f"| {ratio('fastmomentum', 'vs_twin')} |"
        )
    return "\n".join(lines + _deepspeed_lines(groups, threads) + _peer_lines(groups))


def machine_line(report):
    """Where and when a report was measured: CPU, threads, versions, load average."""
    machine, versions = report["machine"], report["versions"]
    load = report["health"]["load_average_1min"]
    libraries = ", ".join(
        f"{name} {versions[name]}"
        for name in ("torch", "numba", "numpy", "deepspeed")
        if name in versions
    )
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {report['threads']['torch']} threads; "
        f"{libraries}; load average {load['before']:g} before, {load['after']:g} after; "
        f"{report['timestamp']}"
    )


def markdown_report(report, threads):
    """The markdown file of a report (its JSON): the machine, the summary tables, the
    notes (missing peers, health) and the precision modes' table."""
    from .precision_speed import markdown as precision_markdown

    missing = report.get("missing_peers", {})
    notes = peer_notes(missing) + health_notes(report["health"])
    precision = report["precision_modes"]
    parts = [
        machine_line(report),
        "",
        markdown_summary(report["results"], threads, missing),
        "",
        *notes,
        "",
        precision_markdown(precision, threads) if precision else "",
    ]
    return "\n".join(parts) + "\n"


def _deepspeed_lines(groups, threads):
    """Adam and AdamW beside DeepSpeedCPUAdam, where it was measured: ours (default mode
    and flat gradients) over its time, and its time over torch fused; the layout marked
    as in the main table."""
    lines = [
        "",
        "| optimizer | layout | dtype | ours ms | ours flat ms | DeepSpeedCPUAdam ms "
        "| torch fused ms | ours / DeepSpeed | flat / DeepSpeed | DeepSpeed / fused |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (optimizer, layout, dtype), by_provider in groups.items():
        peer = by_provider.get("DeepSpeedCPUAdam")
        if not peer:
            continue
        seconds = {name: row["median_s"] for name, row in by_provider.items()}

        def ms(name, seconds=seconds):
            return f"{seconds[name] * 1e3:.3f}" if name in seconds else "-"

        def over(name, base, seconds=seconds):
            return f"{seconds[name] / seconds[base]:.2f}" if {name, base} <= set(seconds) else "-"

        layout = _layout_label(layout, peer, threads, by_provider)
        lines.append(
            f"| {optimizer} | {layout} | {dtype} | {ms('fastmomentum')} "
            f"| {ms('fastmomentum flat')} | {ms('DeepSpeedCPUAdam')} | {ms('torch fused')} "
            f"| {over('fastmomentum', 'DeepSpeedCPUAdam')} "
            f"| {over('fastmomentum flat', 'DeepSpeedCPUAdam')} "
            f"| {over('DeepSpeedCPUAdam', 'torch fused')} |"
        )
    return lines if len(lines) > 3 else []


def _peer_lines(groups):
    """LAMB beside our Adam, the peer its target is set against."""
    lines = [
        "",
        "| optimizer | layout | dtype | ours ms | our Adam ms | ours / our Adam |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for (optimizer, layout, dtype), by_provider in groups.items():
        ours, peer = by_provider.get("fastmomentum"), by_provider.get(PEER)
        if ours and peer:
            lines.append(
                f"| {optimizer} | {layout} | {dtype} | {ours['median_s'] * 1e3:.3f} "
                f"| {peer['median_s'] * 1e3:.3f} | {ours['vs_our_adam']:.2f} |"
            )
    return lines if len(lines) > 3 else []


def plot(rows, path):
    """GB/s against tensor size, one panel per optimizer, the twin as the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = [r for r in rows if r["layout"].endswith("tensor") and r["dtype"] == "float32"]
    optimizers = list(dict.fromkeys(r["optimizer"] for r in sized))
    columns = min(2, len(optimizers))
    rows_of_panels = (len(optimizers) + columns - 1) // columns
    figure, axes = plt.subplots(
        rows_of_panels, columns, figsize=(6 * columns, 4 * rows_of_panels), squeeze=False
    )
    for axis, optimizer in zip(axes.flat, optimizers):
        mine = [r for r in sized if r["optimizer"] == optimizer]
        for provider in dict.fromkeys(r["provider"] for r in mine):
            points = sorted((r["numel"], r["gb_per_s"]) for r in mine if r["provider"] == provider)
            style = {"color": "black", "linestyle": "--"} if provider == TWIN else {"marker": "o"}
            label = f"{provider} (memory limit)" if provider == TWIN else provider
            axis.plot(*zip(*points), label=label, **style)
        axis.set_xscale("log", base=2)
        axis.set_title(f"{optimizer}, float32, one tensor")
        axis.set_xlabel("parameters")
        axis.set_ylabel("GB/s (bytes moved / median step time)")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(optimizers) :]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def progress(done, total, label):
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:60.60}")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\n")


def precision_modes(quick, repeats, threads):
    """Rows of `precision_speed` (16-bit parameters, bfloat16 and 8-bit state, master
    weights: bytes per parameter, step time, ratios to torch fused fp32 and bf16 and to
    the mode's own twin) for the 16M tensor, and in a full run ResNet-50 and GPT-2 too;
    a layout with an unhealthy row is measured again with fewer threads."""
    from . import precision_speed

    layouts = ["16M tensor"] if quick else ["16M tensor", "ResNet-50", "GPT-2 x4 blocks"]
    rows = []
    for name in precision_speed.OPTIMIZERS:
        for layout in layouts:
            progress(0, 1, f"precision modes · {name} · {layout}")
            rows += precision_speed.measure_with_retries(name, layout, repeats, threads)
    return rows


def parse_arguments(argv):
    parser = cli.parser("bench", __doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller sweep (about a minute)")
    cli.add_threads(parser, os.cpu_count())
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=None, help="timed steps per case"
    )
    cli.add_output(parser, "JSON, markdown and PNG")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeedCPUAdam")
    parser.add_argument(
        "--optimizer",
        action="append",
        help="sweep only this optimizer (repeat for several; default: all, or SGD "
        "momentum and Adam with --quick), without the precision modes' rows",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    # Before torch, numba or deepspeed start their thread pools.
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from .providers import OPTIMIZERS, PROVIDERS, deepspeed_applies, deepspeed_status

    unknown = sorted(set(args.optimizer or ()) - set(OPTIMIZERS))
    if unknown:  # checked here: the names are known once torch may be imported
        sys.exit(f"python -m bench: unknown --optimizer {unknown}; one of {list(OPTIMIZERS)}")

    set_threads(args.threads)
    load_before = _load_average()  # before this process adds its own threads
    plan = sweep_plan(args.quick, args.optimizer)
    providers = [p for p in PROVIDERS if p != "DeepSpeedCPUAdam"]
    missing = {}
    if any(deepspeed_applies(OPTIMIZERS[group[0]][0], group[3]) for group in plan):
        if args.no_deepspeed:
            missing["DeepSpeedCPUAdam"] = "skipped with --no-deepspeed"
        else:
            print(
                "DeepSpeedCPUAdam: loading its cpu_adam op (its first use compiles it: "
                "minutes; cached in TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)",
                file=sys.stderr,
            )
            ok, why = deepspeed_status()
            if ok:
                providers.append("DeepSpeedCPUAdam")
            else:
                missing["DeepSpeedCPUAdam"] = why
        for line in peer_notes(missing):
            print(line, file=sys.stderr)  # now, not only after the whole run
    if args.quick:
        providers = [p for p in providers if p != "torch for-loop"]
    repeats = args.repeats or (11 if args.quick else 21)

    rows, retries = [], {}
    for index, group in enumerate(plan):
        label = f"{group[0]} · {group[1]} · {str(group[3])[6:]}"
        progress(index, len(plan), label)

        def announce(threads, index=index, label=label):
            progress(index, len(plan), f"{label} (again on {threads} thr)")

        group_rows, attempts = measure_group(group, providers, repeats, args.threads, announce)
        rows += group_rows
        if len(attempts) > 1:
            retries[group_name(group_rows[0])] = attempts
    progress(len(plan), len(plan), "done")
    # the precision modes' rows (Adam and SGD) belong to a whole sweep, not one optimizer's
    precision_rows = [] if args.optimizer else precision_modes(args.quick, repeats, args.threads)

    mode = "quick" if args.quick else "full"
    summary = health_summary(rows, retries, load_before)
    report = {
        **machine_facts(args.threads),
        "mode": mode,
        "repeats": repeats,
        "health": summary,
        "missing_peers": missing,
        "results": rows,
        "precision_modes": precision_rows,
    }
    notes = peer_notes(missing) + health_notes(summary)
    args.output.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.output / f"{mode}.json", args.output / f"{mode}.png"
    json_path.write_text(json.dumps(report, indent=1))
    (args.output / f"{mode}.md").write_text(markdown_report(report, args.threads))
    plot(rows, png_path)
    print(format_table(rows))
    print("\n" + "\n".join(notes))
    if precision_rows:
        from .precision_speed import markdown as precision_markdown

        print("\nPrecision modes:\n" + precision_markdown(precision_rows, args.threads))
    print(
        f"\n{report['machine']['cpu']}, {args.threads} threads; results in {json_path}, "
        f"{png_path} and {mode}.md beside them"
    )
    if not summary["ok"]:
        print(f"warning: {_warning(summary)}", file=sys.stderr)
    for line in peer_notes(missing):
        print(f"warning: {line.removeprefix('! ')}", file=sys.stderr)


if __name__ == "__main__":
    main()
