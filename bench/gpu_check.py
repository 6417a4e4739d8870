"""GPU check: parity of every optimizer and mode the registry claims for CUDA, and the
step's achieved memory bandwidth, in one command (docs/gpu.md describes its output).

    python -m bench.gpu_check [--list] [--parts parity,bandwidth] [--only Adam,LAMB]
                              [--jobs 8] [--numel 268435456] [--repeats 20]
                              [--contraction on] [--output bench/out]

Needs a CUDA GPU, a CUDA build of torch and numba-cuda with the CUDA toolkit's NVRTC
(``pip install 'numba-cuda[cu12]'`` or ``[cu13]``, matching the driver); ``--list``
needs none and prints what would be checked.

1. Parity: for each optimizer whose row of `fastmomentum.capabilities.CAPABILITIES`
   claims CUDA, each of its benchmark rows in float32, then its first row in each mode
   the row claims (parameter dtypes, bfloat16 and 8-bit state, and for bfloat16
   parameters master weights, stochastic rounding and Kahan summation; the step in
   backward; flat gradients), `STEPS` steps on random data of awkward shapes, against
   the reference `bench.gpu_parity.reference_of` names, within the bound its `bound_of`
   names (`BOUNDS`). The checks are shared out over ``--jobs`` processes on the one
   GPU (`in_processes`), so that the kernels' first-launch compiles, most of a run's
   time, take as many cores.
2. Bandwidth: one buffer of ``--numel`` float32 parameters per benchmark row; the
   median step time of ours and of torch's (fused where it has one, else foreach), as
   bytes moved (`bench.providers.arrays_moved` × 4 × numel) per second and as a share of
   the device's peak: memory clock × 2 (double data rate) × bus width / 8.
3. A markdown report (``--output``, default bench/out/), written again after each row so
   that a run cut short keeps what it measured, and exit status 1 on any parity failure.
   ``--parts`` runs one part alone (``bandwidth`` first, say, on a short lease).
4. ``--contraction on`` compiles every CUDA kernel with NVVM's fused multiply-adds
   (`with_contraction`; the library's kernels have none, `kernels.contraction`): with
   ``--parts exactness``, how far our CUDA step is from our CPU step with and without
   them (docs/gpu.md).
5. ``--parts registers``: the registers of the kernels one step of each row launches,
   as the device's compiler made them, and the limit a launch gave (`registers_part`).
"""

import argparse
import concurrent.futures
import datetime
import multiprocessing
import os
import pathlib
import statistics
import time

import torch

import fastmomentum
from fastmomentum.capabilities import CAPABILITIES, benchmarks

from . import cli
from .gpu_parity import (
    BOUNDS,
    STEPS,
    Check,
    bound_of,
    checks,
    data,
    elements_apart,
    listing,
    make_torch,
    parity_cells,
    side,
    tensors,
    torch_kind,
)


def with_contraction():
    """Compile every CUDA kernel compiled from here on as NVVM does by default, fusing
    products and sums into ``fma.rn`` (`kernels.contraction`: the library compiles them
    with ``-fma=0``), in this process and the parity workers it starts (through the
    environment, read when each imports the kernels): ``--contraction on``, to compare.
    The kernels' source says which, so Numba's cache keeps the two apart."""
    from fastmomentum.kernels import config

    os.environ[CONTRACTION] = "1"
    config.CUDA_CONTRACTION = True


#: `kernels.config.CUDA_CONTRACTION`'s environment variable.
CONTRACTION = "FASTMOMENTUM_CUDA_CONTRACTION"


def in_processes(function, arguments, jobs):
    """``function`` of each of ``arguments``, in order, yielded as each is ready: in
    ``jobs`` processes started afresh (``spawn``: a CUDA context does not survive a
    fork), or in this one for ``jobs`` 1. ``function`` is a module-level function."""
    if jobs <= 1:
        yield from map(function, arguments)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        yield from pool.map(function, arguments)


# --- bandwidth ------------------------------------------------------------------------


def peak_bandwidth(device):
    """Bytes per second: memory clock (kHz) × 1e3 × 2 (double data rate) × bus width (bits)
    / 8, from torch's device properties or numba-cuda's device attributes."""
    properties = torch.cuda.get_device_properties(device)
    clock = getattr(properties, "memory_clock_rate", None)
    width = getattr(properties, "memory_bus_width", None)
    if not clock or not width:
        from numba import cuda

        gpu = cuda.get_current_device()
        clock, width = gpu.MEMORY_CLOCK_RATE, gpu.GLOBAL_MEMORY_BUS_WIDTH
    return clock * 1e3 * 2 * width / 8


def median_ms(step, repeats, device):
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bandwidth(row, device, numel, repeats):
    """(bytes moved per step, ours ms, torch ms or None, torch's kind)."""
    from .providers import arrays_moved

    name, options = benchmarks()[row]
    result = {}
    for provider in ("ours", "torch"):
        if provider == "torch" and torch_kind(name) is None:
            break
        shape = (numel // 4096, 4096) if name == "Muon" else (numel,)  # Muon: matrices
        param = torch.nn.Parameter(torch.randn(shape, device=device))
        param.grad = torch.randn_like(param)
        check = Check(name, row, options, "fp32", torch.float32, {})
        if provider == "ours":
            optimizer, kind = getattr(fastmomentum, name)([param], **options), "ours"
        else:
            optimizer, kind = make_torch(check, [param])
        result[provider] = (median_ms(optimizer.step, repeats, device), kind)
        del optimizer, param
        torch.cuda.empty_cache()
    return arrays_moved(row) * 4 * numel, result


# --- the command ------------------------------------------------------------------------


PARTS = ("parity", "bandwidth", "exactness", "registers")


def parts(text):
    """``argparse`` type: a comma-separated subset of `PARTS`, in the order given."""
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"expected parts among {', '.join(PARTS)}, got {text!r}")
    return chosen


class Report:
    """The markdown report, rewritten to ``path`` at each `add` (a run cut short keeps
    its rows) and printed line by line."""

    def __init__(self, path, lines):
        self.path, self.lines = path, []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.add(*lines)

    def add(self, *lines):
        self.lines += lines
        print("\n".join(lines), flush=True)
        self.path.write_text("\n".join(self.lines) + "\n")


def parity_part(report, jobs, only=None):
    """The parity table (of the optimizers in ``only``, else all); returns the number of
    failed checks."""
    report.add(f"\n## Parity, {STEPS} steps\n")
    report.add(
        "| optimizer | row | mode | reference | bound | worst (tensor) | bits apart | result |"
    )
    report.add("| --- | --- | --- | --- | --- | --: | --: | --- |")
    failures = 0
    chosen = [i for i, check in enumerate(checks()) if not only or check.name in only]
    found = in_processes(parity_cells, chosen, jobs)
    for check, (used, worst, passed, apart) in zip((checks()[i] for i in chosen), found):
        failures += not passed
        cells = [check.name, check.row, check.mode, used, bound_of(check), worst, apart]
        report.add("| " + " | ".join(cells + ["ok" if passed else "FAILED"]) + " |")
    return failures


def exactness_part(report, device):
    """One fp32 step of each benchmark row on the GPU and on the CPU from the same data:
    how many elements of each tensor differ (the CPU loop computes each rule as written,
    bit for bit with Numba's simulator), and how many fused multiply-adds the PTX of the
    row's launched kernels holds (``fma.rn``: a·b + c rounded once, where NVVM contracts
    what the rule writes as a product and a sum). LAMB's norms and Muon's Newton–Schulz
    add in another order on the GPU: they may differ for that reason alone."""
    report.add(
        "\n## Our CUDA step against our CPU step, one fp32 step\n",
        "| row | elements differing | tensors differing | fma.rn in the launched PTX |",
        "| --- | --: | --- | --: |",
    )
    for row, (name, options) in benchmarks().items():
        if not CAPABILITIES[name].cuda:
            continue
        check = Check(name, row, options, "fp32", torch.float32, {})
        start, grads = data(check)
        params, ours, _ = side(check, device, start, grads[:1])
        ref_params, theirs, _ = side(check, "cpu", start, grads[:1], "our CPU step")
        mine, wanted = tensors(params, ours), tensors(ref_params, theirs)
        differing = {k: elements_apart(mine[k], v) for k, v in wanted.items()}
        total = sum(v.numel() for v in wanted.values())
        named = ", ".join(k for k, n in differing.items() if n)[:80] or "none"
        cells = [row, f"{sum(differing.values())} of {total}", named, str(launched_fmas(name))]
        report.add("| " + " | ".join(cells) + " |")


def launched_fmas(name):
    """``fma.rn`` instructions in the PTX of every CUDA kernel of ``name``'s rule module
    that has been compiled in this process (`kernels.cuda.kernels_of`: one per flag
    values and register limit); a note where the PTX is not at hand. Read inside
    `kernels.contraction.uncontracted`, as launches compile: numba-cuda 0.30's
    ``inspect_asm`` keys the PTX by the compute capability as a pair, where a launch's
    key has a third element (the ``a`` of sm_90a), so it compiles the PTX again, which
    outside would be NVVM's default."""
    from fastmomentum.kernels import contraction, rules
    from fastmomentum.kernels import cuda as kernels
    from fastmomentum.kernels.specs import KernelSpec

    module = getattr(rules, CAPABILITIES[name].module, None)
    values = vars(module).values() if module is not None else ()
    found = 0
    for spec in (value for value in values if isinstance(value, KernelSpec)):
        for dispatcher in kernels.kernels_of(spec):
            if not getattr(dispatcher, "overloads", None):  # none in the simulator
                continue
            try:
                with contraction.uncontracted():
                    assembly = dispatcher.inspect_asm()
                found += sum(ptx.count("fma.rn") for ptx in assembly.values())
            except Exception:  # a kernel read from Numba's cache may keep no PTX
                return "n/a (run with an empty NUMBA_CACHE_DIR)"
    return found


#: The modes whose kernels bench.gpu_static's table gives a register limit (sm_90:
#: float32 parameters, bfloat16 state, capturable; `kernels.cuda.fitted`).
LIMITED = {
    "RAdam": {"capturable": True, "state_dtype": torch.bfloat16},
    "LAMB": {"capturable": True, "state_dtype": torch.bfloat16},
}
#: The element types of a launch table, as bench.gpu_static's formats name them.
TYPE_NAMES = {"float32": "fp32", "float64": "fp64", "uint16": "bf16", "int16": "fp16"}


def registers_part(report, device):
    """One step of each benchmark row with CUDA in fp32 and of each mode of `LIMITED`,
    then the registers of every kernel launched, as this device's compiler made them
    (bench/results/gpu_static.md has ptxas 12.9's), with the limit a launch gave
    (`kernels.cuda.fitted`) and the local memory a thread uses (spills)."""
    rows = benchmarks()
    steps = [(row, name, options, {}) for row, (name, options) in rows.items()]
    for name, extra in LIMITED.items():
        row = next(row for row, (owner, _) in rows.items() if owner == name)
        steps.append((row, name, rows[row][1], extra))
    for row, name, options, extra in steps:
        if CAPABILITIES[name].cuda:
            check = Check(name, row, options, "registers", torch.float32, extra)
            start, grads = data(check)
            side(check, device, start, grads[:1])
    report.add(
        "\n## Registers of the kernels launched, as this device compiled them\n",
        "| kernel | param / grad / state / companion | registers | limit given | local B |",
        "| --- | --- | --: | --: | --: |",
    )
    for line in register_rows():
        report.add(line)


def register_rows():
    """A row per kernel launched in this process (`kernels.cuda.launched`) and compiled
    signature: its registers and local memory per thread, and the limit given."""
    from fastmomentum.kernels import cuda as kernels

    rows = []
    for spec, flags, types, limit, dispatcher in kernels.launched():
        named = "+".join([spec.name, *(flag for flag, on in zip(spec.flags, flags) if on)])
        kinds = " / ".join(TYPE_NAMES.get(kind.__name__, kind.__name__) for kind in types)
        for compiled in getattr(dispatcher, "overloads", {}).values():  # none in the simulator
            cells = [named, kinds, str(compiled.regs_per_thread), str(limit or "–")]
            rows.append("| " + " | ".join([*cells, str(compiled.local_mem_per_thread)]) + " |")
    return rows


def bandwidth_part(report, device, numel, repeats):
    """The bandwidth table, one row per benchmark row of an optimizer with CUDA."""
    peak = peak_bandwidth(device)
    report.add(
        f"\n## Bandwidth, {numel / 2**20:.0f}M fp32 parameters, median of {repeats}",
        f"\nPeak: memory clock × 2 × bus width / 8 = {peak / 1e9:.0f} GB/s\n",
        "| row | bytes/param | ours ms | ours GB/s | ours % peak | torch | torch ms "
        "| torch GB/s | torch % peak |",
        "| --- | --: | --: | --: | --: | --- | --: | --: | --: |",
    )
    for row, (name, _) in benchmarks().items():
        if not CAPABILITIES[name].cuda:
            continue
        moved, result = bandwidth(row, device, numel, repeats)
        cells = [row, f"{moved / numel:.0f}"]
        for provider in ("ours", "torch"):
            milliseconds, kind = result.get(provider, (None, "–"))
            if milliseconds is None:
                cells += ["–"] * (3 if provider == "ours" else 4)
                continue
            rate = moved / (milliseconds / 1e3)
            cells += [kind] if provider == "torch" else []
            cells += [f"{milliseconds:.3f}", f"{rate / 1e9:.0f}", f"{100 * rate / peak:.0f}%"]
        report.add("| " + " | ".join(cells) + " |")


def main(argv=None):
    parser = cli.parser("bench.gpu_check", __doc__)
    parser.add_argument("--list", action="store_true", help="print the checks; needs no GPU")
    parser.add_argument(
        "--parts",
        type=parts,
        default=["parity", "bandwidth"],
        help="comma-separated parts to run, in that order (default: parity,bandwidth; "
        "exactness: our CUDA step against our CPU step, element by element; registers: "
        "of the kernels launched, as the device compiled them)",
    )
    parser.add_argument(
        "--only",
        type=lambda text: set(text.split(",")),
        help="comma-separated optimizer classes whose parity checks run (default: all)",
    )
    parser.add_argument(
        "--numel", type=cli.positive_int, default=256 * 2**20, help="parameters per buffer"
    )
    parser.add_argument("--repeats", type=cli.positive_int, default=20, help="timed steps")
    parser.add_argument(
        "--jobs",
        type=cli.positive_int,
        default=min(8, os.cpu_count() or 1),
        help="processes the parity checks are shared over (1: all in this one)",
    )
    parser.add_argument(
        "--contraction",
        choices=("on", "off"),
        default="off",
        help="on: compile the CUDA kernels with NVVM's fused multiply-adds (its default; "
        "the library's kernels have none: -fma=0), to compare",
    )
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("bench/out"))
    args = parser.parse_args(argv)
    unknown = sorted((args.only or set()) - {check.name for check in checks()})
    if unknown:
        parser.error(f"--only: no checks for {', '.join(unknown)}")
    if args.list:
        print("\n".join(listing()))
        print(f"\n{len(checks())} checks, {STEPS} steps each. Bounds:")
        print("\n".join(f"- {name}: {text}" for name, text in BOUNDS.items()))
        return
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench.gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is "
            f"False; torch {torch.__version__}); `--list` prints what it checks"
        )
    device = torch.device("cuda", torch.cuda.current_device())
    began = time.perf_counter()
    if args.contraction == "on":
        with_contraction()
    head = (
        f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}, fastmomentum {fastmomentum.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"kernels compiled with{'' if args.contraction == 'on' else 'out'} FMA contraction"
    )
    report = Report(args.output / "gpu_check.md", [f"# GPU check\n\n{head}"])
    failures = 0
    for part in args.parts:
        if part == "parity":
            failures = parity_part(report, args.jobs, args.only)
        elif part == "bandwidth":
            bandwidth_part(report, device, args.numel, args.repeats)
        elif part == "registers":
            registers_part(report, device)
        else:
            exactness_part(report, device)

    seconds = time.perf_counter() - began
    verdict = f"{failures} parity failure(s)" if failures else "parity: every check ok"
    if "parity" not in args.parts:
        verdict = "parity not run"
    report.add(f"\n{verdict}; {seconds:.0f} s in all; report: {report.path}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
