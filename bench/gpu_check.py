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
   the reference `reference_of` names, within the bound `bound_of` names (`BOUNDS`).
   The checks are shared out over ``--jobs`` processes on the one GPU (`in_processes`),
   so that the kernels' first-launch compiles, most of a run's time, take as many cores.
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
import inspect
import multiprocessing
import os
import pathlib
import statistics
import time
from typing import NamedTuple

import torch

import fastmomentum
from fastmomentum.capabilities import CAPABILITIES, benchmarks

from . import cli

STEPS = 10
SHAPES = [(1000, 257), (4096,), (3, 64, 7, 7), (1,), (0,), (33, 1023)]
SHORT = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16"}
#: Mode -> constructor options (float32 parameters unless the mode names a dtype).
STATE_MODES = {"bfloat16": "bf16 state", "int8_blockwise": "int8 state"}
SIXTEEN_BIT_MODES = {
    "master_weights": "bf16 master weights",
    "stochastic_rounding": "bf16 stochastic rounding",
    "kahan_sum": "bf16 Kahan",
}
#: The bits of stochastic rounding are keyed on the group's seed (random by default).
SEEDED = {"stochastic_rounding": {"rounding_seed": 0}}
#: Bound name -> what it allows; the CPU parity tests' bounds (tests/assertions.py RTOL,
#: tests/test_rounding.py for 16-bit and 8-bit values, the bit-identity claims of
#: tests/test_precision_params.py, test_step_in_backward.py and test_master_weights.py).
BOUNDS = {
    "bits": "bit-identical, every tensor: the same kernels launched per parameter (the "
    "step in backward) or replayed from a CUDA graph, against the bucket's launch",
    "rtol": "max|a−b| ≤ rtol·max|b| per tensor: fp64 1e-12, fp32 1e-5 (×2 for NAdam, its "
    "extra roundings, and against torch's fused CUDA kernels, which round 1 − β to float32: "
    "0.001 becomes 0.00099998713, 1.3e-5 apart); 16-bit tensors within one 16-bit step of "
    "each element (near 0: of 2⁻⁸·max|b|), ≤ 1% of elements differing; 8-bit codes within "
    "one code, ≤ 1% differing; counts equal",
}
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
FACTOR = {"NAdam": 2.0}
#: torch's fused CUDA Adam and AdamW compute 1 − β1 and 1 − β2 in float32 (their
#: "opmath" type): exp_avg_sq 1.3e-5 apart from ours after 10 steps (H200, 2026-12-04).
FUSED_CUDA_FACTOR = 2.0
#: Lion's step is ±lr by the sign of β1·m + (1−β1)·g: one ulp flips it where that is
#: within an ulp of 0, moving the element by 2·lr.
ELEMENTS_ALLOWED_OUT = {"Lion": 1e-4}


class Check(NamedTuple):
    name: str  # the fastmomentum class
    row: str  # its benchmark row
    options: dict
    mode: str
    dtype: torch.dtype
    extra: dict  # the mode's constructor options


def checks():
    """Every optimizer × mode its registry row claims for CUDA, in the registry's order."""
    rows = benchmarks()
    out = []
    for name, caps in CAPABILITIES.items():
        if not caps.cuda:
            continue
        own = [(row, options) for row, (cls, options) in rows.items() if cls == name]
        for row, options in own:
            out.append(Check(name, row, options, "fp32", torch.float32, {}))
        row, options = own[0]
        for dtype in caps.param_dtypes:
            if dtype != "float32":
                out.append(Check(name, row, options, SHORT[dtype], getattr(torch, dtype), {}))
        for state, mode in STATE_MODES.items():
            if state in caps.state_dtypes:
                extra = {"state_dtype": getattr(torch, state, state)}
                out.append(Check(name, row, options, mode, torch.float32, extra))
        if "bfloat16" in caps.param_dtypes:
            for option, mode in SIXTEEN_BIT_MODES.items():
                if option in caps.sixteen_bit_options:
                    extra = {option: True, **SEEDED.get(option, {})}
                    out.append(Check(name, row, options, mode, torch.bfloat16, extra))
        if caps.step_in_backward:
            extra = {"step_in_backward": True}
            out.append(Check(name, row, options, "step in backward", torch.float32, extra))
        extra = {"flat_gradients": True}
        out.append(Check(name, row, options, "flat gradients", torch.float32, extra))
        if caps.capturable:
            extra = {"capturable": True}
            out.append(Check(name, row, options, "capturable", torch.float32, extra))
            out.append(Check(name, row, options, CUDA_GRAPH, torch.float32, extra))
    return out


#: The mode of a capturable step captured once in a CUDA graph and replayed (`captured`).
CUDA_GRAPH = "capturable, CUDA graph"


#: torch optimizers that take ``fused=True`` but whose fused step runs on the CPU only:
#: on CUDA tensors it raises at the first step (torch 2.11: "`fused=True` requires all
#: the params to be floating point Tensors of supported devices: ['mps', 'xpu', …]").
FUSED_ON_CPU_ONLY = {"Adagrad"}


def _torch_kind(name):
    """torch's fastest CUDA implementation of ``name``'s peer: fused, foreach or loop."""
    peer = CAPABILITIES[name].torch_peer
    if peer is None or not hasattr(torch.optim, peer):
        return None
    parameters = inspect.signature(getattr(torch.optim, peer)).parameters
    if "fused" in parameters and peer not in FUSED_ON_CPU_ONLY:
        return "fused"
    return "foreach" if "foreach" in parameters else "loop"


def reference_of(check):
    """What ``check`` is compared with: torch's CUDA optimizer where torch has the mode
    (master weights: torch on float32 twins, whose values the copy must follow), our
    CUDA ordinary step for the step in backward, else our CPU step on the same data."""
    kind = _torch_kind(check.name)
    sixteen = check.dtype in (torch.bfloat16, torch.float16)
    if check.mode == "step in backward":
        return "our CUDA step"
    if check.mode == CUDA_GRAPH:
        return "our capturable step"
    if kind is None or (
        check.extra and not {"master_weights", "flat_gradients", "capturable"} & set(check.extra)
    ):
        return "our CPU step"  # LAMB, Lion; bf16 and 8-bit state, SR, Kahan: torch has none
    if "master_weights" in check.extra:
        return f"torch {kind}, fp32 twins"
    if sixteen and kind != "fused":
        # torch's foreach and for-loop round each op to 16 bits: no reference for a step
        # computed in float32 and rounded once (tests/test_precision_params.py)
        return "our CPU step"
    return f"torch {kind}"


def bound_of(check):
    """ "bits" where the same CUDA kernels must give the same bits, else "rtol": on an
    H200 our CUDA step is not our CPU step bit for bit (fp32 states one ulp apart in
    about half their elements; docs/gpu.md, "First run on a GPU")."""
    if check.mode in ("step in backward", CUDA_GRAPH):
        return "bits"
    return "rtol"


# --- parity -------------------------------------------------------------------------


def shapes_for(name):
    if not getattr(getattr(fastmomentum, name), "matrices_only", False):
        return SHAPES
    return [(1000, 257), (33, 1023), (64, 147), (1, 1), (0, 5)]


def data(check):
    """Starting values and per-step gradients, made on the CPU so every side gets the
    same numbers."""
    generator = torch.Generator().manual_seed(0)
    shapes = shapes_for(check.name)
    start = [torch.randn(s, generator=generator).to(check.dtype) for s in shapes]
    grads = [
        [torch.randn(s, generator=generator).to(check.dtype) for s in shapes] for _ in range(STEPS)
    ]
    return start, grads


def make_torch(check, params):
    peer = getattr(torch.optim, CAPABILITIES[check.name].torch_peer)
    kind = _torch_kind(check.name)
    takes = inspect.signature(peer).parameters  # torch's SGD and Adagrad have no capturable
    capturable = "capturable" in check.extra and "capturable" in takes
    options = {**check.options, **({"capturable": True} if capturable else {})}
    if kind == "fused":
        return peer(params, fused=True, **options), "fused"
    flag = {"foreach": True} if kind == "foreach" else {}
    return peer(params, **options, **flag), kind


def run(optimizer, params, grads, in_backward=False, keep_grads=False):
    """``STEPS`` steps; gradients through a backward of Σ p·g, so the step in backward
    runs as in training."""
    for step_grads in grads:
        loss = sum((p.float() * g.to(p.device).float()).sum() for p, g in zip(params, step_grads))
        loss.backward()
        if not in_backward:
            optimizer.step()
            optimizer.zero_grad(set_to_none=not keep_grads)
    return optimizer


def side(check, device, start, grads, reference=None):
    """Our optimizer on ``device`` (``reference``: the reference of ``check`` instead),
    with ``check``'s mode; returns (params, optimizer, what it is)."""
    dtype = torch.float32 if reference and "fp32 twins" in reference else check.dtype
    params = [torch.nn.Parameter(s.to(device, dtype, copy=True)) for s in start]
    grads = [[g.to(dtype) for g in step] for step in grads]
    if reference and reference.startswith("torch"):
        optimizer, kind = make_torch(check, params)
        return params, run(optimizer, params, grads), f"torch {kind}"
    extra = {} if reference == "our CUDA step" else dict(check.extra)
    if reference == "our CPU step":
        extra.pop("capturable", None)  # CPU parameters refuse it: the ordinary step
    optimizer = getattr(fastmomentum, check.name)(params, **check.options, **extra)
    in_backward = extra.get("step_in_backward", False)
    keep = extra.get("flat_gradients", False)
    return params, run(optimizer, params, grads, in_backward, keep), reference or "ours"


def compare(a, b, bound, name, reference=""):
    """The worst difference of ``a`` against ``b`` as a number (relative, or 16-bit
    steps, or codes) and whether it is within ``bound`` (`BOUNDS`) for ``name`` against
    ``reference``."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_floating_point():  # NaN and inf must lie alike; the rest is compared
        finite = a.isfinite() & b.isfinite()
        if not torch.equal(a[~finite].double(), b[~finite].double()):
            return float("inf"), False
        a, b = a[finite], b[finite]
    if a.numel() == 0:
        return 0.0, True
    if bound == "bits" or not a.is_floating_point() and a.dtype not in (torch.uint8, torch.int8):
        differ = int((a != b).sum()) if a.shape == b.shape else -1
        return float(differ), differ == 0
    if not a.is_floating_point():  # 8-bit codes
        apart = (a.int() - b.int()).abs()
        return float(apart.max()), bool(apart.max() <= 1 and (apart > 0).float().mean() <= 0.01)
    fused = reference.startswith("torch fused")
    if a.dtype in RTOL:
        scale = b.double().abs().max().clamp_min(1e-300)
        error = (a.double() - b.double()).abs()
        rtol = RTOL[a.dtype] * FACTOR.get(name, 1.0) * (FUSED_CUDA_FACTOR if fused else 1.0)
        out = float((error > rtol * scale).double().mean())
        return float(error.max() / scale), out <= ELEMENTS_ALLOWED_OUT.get(name, 0.0)
    eps = torch.finfo(a.dtype).eps
    af, bf = a.float(), b.float()
    near_zero = bf.abs().max() * eps * 2**-7
    one_step = torch.maximum(torch.maximum(af.abs(), bf.abs()) * eps * 2, near_zero)
    apart = (af - bf).abs()
    steps = float((apart / (one_step / 2 + torch.finfo(a.dtype).tiny)).max())
    within = bool((apart <= one_step + torch.finfo(a.dtype).tiny).all())
    differing = float((apart > 0).float().mean())
    return steps, within and differing <= 0.01


def tensors(params, optimizer):
    """Name -> tensor: each parameter and its state (tensor entries), by position."""
    out = {}
    for index, p in enumerate(params):
        out[f"p{index}"] = p
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[f"p{index}.{key}"] = value
    return out


def captured(check, device, start, grads, graph=True):
    """Ours with ``capturable=True``, gradients set into static tensors (``p.grad``): two
    steps on a side stream (the warm-up torch asks for), then, with ``graph``, one step
    captured in a CUDA graph and replayed for each further step's gradients; without,
    the same steps launched as usual. Returns (params, optimizer)."""
    params = [torch.nn.Parameter(s.to(device, check.dtype, copy=True)) for s in start]
    optimizer = getattr(fastmomentum, check.name)(params, **check.options, capturable=True)
    static = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static):
        p.grad = g

    def take(step_grads):
        for g, new in zip(static, step_grads):
            g.copy_(new.to(device, check.dtype))

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for step_grads in grads[:2]:
            take(step_grads)
            optimizer.step()
    torch.cuda.current_stream(device).wait_stream(side)
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            optimizer.step()
    for step_grads in grads[2:]:
        take(step_grads)
        if graph:
            cuda_graph.replay()
        else:
            optimizer.step()
    torch.cuda.synchronize(device)
    return params, optimizer


def parity(check, device):
    """Steps ``check`` and its reference; (reference used, worst difference, passed,
    elements not bit-identical as "k of n")."""
    start, grads = data(check)
    reference = reference_of(check)
    if check.mode == CUDA_GRAPH:  # replays against launches, bit for bit
        params, ours = captured(check, device, start, grads)
        ref_params, theirs = captured(check, device, start, grads, graph=False)
        worst = Worst()
        wanted, mine = tensors(ref_params, theirs), tensors(params, ours)
        for key, value in wanted.items():
            worst.add(key, *compare(mine[key], value, "bits", check.name, reference))
        return reference, worst.text, worst.passed, bits_apart(mine, wanted)
    ref_device = "cpu" if reference == "our CPU step" else device
    params, ours, _ = side(check, device, start, grads)
    ref_params, theirs, used = side(check, ref_device, start, grads, reference)
    bound = bound_of(check)
    mine, wanted = tensors(params, ours), tensors(ref_params, theirs)
    if "fp32 twins" in reference:  # the float32 copy follows torch's float32 parameters
        for index in range(len(params)):
            mine[f"p{index}"] = mine.pop(f"p{index}.master_param")
    worst = Worst()
    for key, value in wanted.items():
        if key not in mine:
            continue  # torch's keys we do not keep, e.g. a fused step's tensors
        worst.add(key, *compare(mine[key], value, bound, check.name, used))
    if "master_weights" in check.extra:  # the parameter is its float32 copy rounded, bit for bit
        for index, p in enumerate(params):
            copy = ours.state[p]["master_param"]
            worst.add(f"p{index} vs master_param", 0.0, torch.equal(p.detach(), copy.to(p.dtype)))
    return used, worst.text, worst.passed, bits_apart(mine, wanted)


def bits_apart(mine, wanted):
    """ "k of n": how many of the n elements of ``wanted``'s tensors (those ``mine`` has
    too) are not bit-identical to ours, NaN equal to NaN: whatever the bound, so that a
    run shows where ours and the reference are the same bits (16-bit and 8-bit modes
    against our CPU step, once both compile without contraction: docs/gpu.md), as
    "k of n"."""
    shared = [key for key in wanted if key in mine]
    apart = sum(elements_apart(mine[key], wanted[key]) for key in shared)
    return f"{apart} of {sum(wanted[key].numel() for key in shared)}"


def elements_apart(a, b):
    """How many elements of ``a`` are not the same bits as ``b``'s (NaN is NaN; 0.0 and
    -0.0 are apart); all of them where the shapes differ."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape:
        return b.numel()
    if not a.is_floating_point():
        return int((a != b).sum())
    same = (a == b) & (a.signbit() == b.signbit()) | a.isnan() & b.isnan()
    return int((~same).sum())


class Worst:
    """The worst difference over a check's tensors, and where it is: the report names
    the first tensor out of bound (else the largest difference) by its `tensors` key."""

    def __init__(self):
        self.difference, self.key, self.passed = 0.0, "", True

    def add(self, key, difference, within):
        first_failure = self.passed and not within
        if first_failure or (within == self.passed and difference > self.difference):
            self.difference, self.key = difference, key
        self.passed = self.passed and within

    @property
    def text(self):
        return f"{self.difference:.2e} ({self.key})" if self.key else f"{self.difference:.2e}"


def parity_cells(index):
    """``(reference used, worst difference, passed, bits apart)`` of the ``index``-th of
    `checks` on the current CUDA device, a mode that cannot run (an exception) a failure
    reported by its exception."""
    check = checks()[index]
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        return parity(check, device)
    except Exception as error:
        return reference_of(check), f"{type(error).__name__}: {error}", False, "–"


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
        if provider == "torch" and _torch_kind(name) is None:
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


def listing():
    lines = ["| optimizer | row | mode | reference | bound |", "| --- | --- | --- | --- | --- |"]
    for check in checks():
        cells = [check.name, check.row, check.mode, reference_of(check), bound_of(check)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
