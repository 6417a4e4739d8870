"""The report command: a sweep over optimizers, layouts and providers, as a table, JSON and PNG.

    python -m bench              # full sweep, a few minutes on 2 cores
    python -m bench --quick      # about a minute

Every group (optimizer × layout) times all providers and the traffic twin in one
interleaved run; the table shows the median step time, the bandwidth it implies, and
the ratios to torch's fused step and to the twin (the memory limit).
"""

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

TWIN = "traffic twin"
RESULTS = Path(__file__).resolve().parent / "results"


def sweep_plan(quick):
    """(optimizer, layout name, shapes, dtype) groups of the sweep."""
    import torch

    from .layouts import LAYOUTS, single

    optimizers = ["SGD momentum", "Adam"] if quick else list(_optimizer_names())
    exponents = [14, 18, 22] if quick else [12, 14, 16, 18, 20, 22, 24]
    models = (
        ["ResNet-50", "MLP 784-256-10"]
        if quick
        else ["ResNet-50", "GPT-2 x4 blocks", "MLP 784-256-10"]
    )
    plan = []
    for optimizer in optimizers:
        for exponent in exponents:
            plan.append((optimizer, f"2^{exponent} tensor", single(2**exponent), torch.float32))
        for layout in models:
            plan.append((optimizer, layout, LAYOUTS[layout](), torch.float32))
        if not quick:
            plan.append((optimizer, "2^22 tensor", single(2**22), torch.float64))
    return plan


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
                "vs_twin": seconds / twin,
            }
        )
    return rows


def machine_facts(threads):
    import numba
    import numpy
    import torch

    import fastmomentum

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
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
        f"{'GB/s':>6} {'x fused':>8} {'x twin':>7}"
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
            f"{row['vs_twin']:7.2f}"
        )
    return "\n".join(lines)


def markdown_summary(rows):
    """One line per (optimizer, layout, dtype): ours (default mode and flat gradients)
    beside torch fused, DeepSpeed and the twin."""
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

        def ratio(provider, key, by_provider=by_provider):
            row = by_provider.get(provider)
            return f"{row[key]:.2f}" if row and row[key] else "-"

        lines.append(
            f"| {optimizer} | {layout} | {dtype} | {ms('fastmomentum')} "
            f"| {ms('fastmomentum flat')} | {ms('torch fused')} | {ms('DeepSpeedCPUAdam')} "
            f"| {ms(TWIN)} | {ratio('fastmomentum', 'vs_torch_fused')} "
            f"| {ratio('fastmomentum flat', 'vs_torch_fused')} "
            f"| {ratio('fastmomentum', 'vs_twin')} |"
        )
    return "\n".join(lines)


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
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:48}")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description="fastmomentum vs torch.optim: step benchmark")
    parser.add_argument("--quick", action="store_true", help="a smaller sweep (about a minute)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for all")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for JSON and PNG")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeedCPUAdam")
    args = parser.parse_args(argv)

    # Before torch, numba or deepspeed start their thread pools.
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numba
    import torch

    from .providers import PROVIDERS, deepspeed_available

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    providers = [p for p in PROVIDERS if p != "DeepSpeedCPUAdam"]
    if not args.no_deepspeed and deepspeed_available():
        providers.append("DeepSpeedCPUAdam")
    if args.quick:
        providers = [p for p in providers if p != "torch for-loop"]
    repeats = args.repeats or (11 if args.quick else 21)

    plan = sweep_plan(args.quick)
    rows = []
    for index, (optimizer, layout, shapes, dtype) in enumerate(plan):
        progress(index, len(plan), f"{optimizer} · {layout} · {str(dtype)[6:]}")
        rows += run_group(optimizer, layout, shapes, dtype, providers, repeats)
    progress(len(plan), len(plan), "done")

    mode = "quick" if args.quick else "full"
    report = {**machine_facts(args.threads), "mode": mode, "repeats": repeats, "results": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.output / f"{mode}.json", args.output / f"{mode}.png"
    json_path.write_text(json.dumps(report, indent=1))
    (args.output / f"{mode}.md").write_text(markdown_summary(rows) + "\n")
    plot(rows, png_path)
    print(format_table(rows))
    print(
        f"\n{report['machine']['cpu']}, {args.threads} threads; results in {json_path}, "
        f"{png_path} and {mode}.md beside them"
    )


if __name__ == "__main__":
    main()
