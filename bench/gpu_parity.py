"""Parity on a GPU, part 1 of `bench.gpu_check`: each optimizer and mode the registry
claims for CUDA, `STEPS` steps on random data of awkward shapes, ours against the
reference `reference_of` names (torch's CUDA optimizer where torch has the mode, else
our own CPU or CUDA step), within the bound `bound_of` names (`BOUNDS`); `parity_cells`
runs one check, as `bench.gpu_check`'s worker processes do. docs/gpu.md describes the
table and its bounds.
"""

import contextlib
import inspect
from typing import NamedTuple

import torch

import fastmomentum
from fastmomentum.capabilities import CAPABILITIES, benchmarks

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
    "step in backward) or replayed from a CUDA graph, against the bucket's launch; and our "
    "CUDA step against our CPU step, both computing each rule as written (no FMA "
    "contraction: kernels.contraction), but for LAMB's and Muon's sums and products",
    "rtol": "max|a−b| ≤ rtol·max|b| per tensor: fp64 1e-12, fp32 1e-5 (×2 for NAdam, its "
    "extra roundings, and against torch's fused CUDA kernels, which round 1 − β to float32: "
    "0.001 becomes 0.00099998713, 1.3e-5 apart); 16-bit tensors within one 16-bit step of "
    "each element (near 0: of 2⁻⁸·max|b|), ≤ 1% of elements differing (a Kahan pair: the "
    "float32 p + c it holds, as fp32); 8-bit codes within one code, ≤ 1% differing; counts "
    "equal",
    "rounding": "16-bit tensors against torch's CUDA kernels, which round a step's float32 "
    "values their own way (nvcc fuses their products and sums: torch's fused Adam computes "
    "fma(β1, m, (1−β1)·g), our rule torch's fused CPU step's lerp): max|a−b| ≤ steps·ε·max|b| "
    "per tensor, one 16-bit step of its largest value per step, carried on by the "
    "recurrences (10 steps: 7% of bf16 exp_avg apart, by up to 5.3·ε·max|b|); other tensors "
    "as rtol",
}
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
FACTOR = {"NAdam": 2.0}
#: torch's fused CUDA Adam and AdamW compute 1 − β1 and 1 − β2 in float32 (their
#: "opmath" type): exp_avg_sq 1.3e-5 apart from ours after 10 steps (H200, 2026-12-04).
FUSED_CUDA_FACTOR = 2.0


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


#: Optimizers whose CUDA step adds a sum or a matrix product in another order than their
#: CPU step: LAMB's norms (per GPU segment, per CPU chunk), Muon's Newton–Schulz
#: (cuBLAS against the CPU's matrix products).
SUMMED_IN_ANOTHER_ORDER = {"LAMB", "Muon"}
#: The mode of a capturable step captured once in a CUDA graph and replayed (`captured`).
CUDA_GRAPH = "capturable, CUDA graph"


#: torch optimizers that take ``fused=True`` but whose fused step runs on the CPU only:
#: on CUDA tensors it raises at the first step (torch 2.11: "`fused=True` requires all
#: the params to be floating point Tensors of supported devices: ['mps', 'xpu', …]").
FUSED_ON_CPU_ONLY = {"Adagrad"}


def torch_kind(name):
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
    kind = torch_kind(check.name)
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
    """ "bits" where the same CUDA kernels must give the same bits, and against our CPU
    step (`SUMMED_IN_ANOTHER_ORDER` apart); "rounding" for 16-bit parameters against
    torch's CUDA step (another rounding of each step); else "rtol". Against our CPU
    step, the H200's differences were NVVM's FMA contraction, since removed: LLVM's
    contraction on the CPU gives the same counts of differing elements (bench/NOTES.md
    entries 30-31); not yet run on a GPU without it."""
    if check.mode in ("step in backward", CUDA_GRAPH):
        return "bits"
    reference = reference_of(check)
    if reference == "our CPU step" and check.name not in SUMMED_IN_ANOTHER_ORDER:
        return "bits"
    sixteen = check.dtype in (torch.bfloat16, torch.float16)
    if sixteen and reference.startswith("torch") and "fp32 twins" not in reference:
        return "rounding"
    return "rtol"


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
    kind = torch_kind(check.name)
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
    steps of each element or, for ``rounding``, of the tensor's largest value, or codes)
    and whether it is within ``bound`` (`BOUNDS`) for ``name`` against ``reference``."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_floating_point():  # NaN and inf must lie alike; the rest is compared
        finite = a.isfinite() & b.isfinite()
        if elements_apart(a[~finite], b[~finite]):  # NaN is NaN (torch.equal: never)
            return float("inf"), False
        a, b = a[finite], b[finite]
    if a.numel() == 0:
        return 0.0, True
    if bound == "bits" or not a.is_floating_point() and a.dtype not in (torch.uint8, torch.int8):
        differ = elements_apart(a, b)  # as the *bits apart* column counts: -0.0 is not 0.0
        return float(differ), differ == 0
    if not a.is_floating_point():  # 8-bit codes
        apart = (a.int() - b.int()).abs()
        return float(apart.max()), bool(apart.max() <= 1 and (apart > 0).float().mean() <= 0.01)
    fused = reference.startswith("torch fused")
    if a.dtype in RTOL:
        scale = b.double().abs().max().clamp_min(1e-300)
        error = (a.double() - b.double()).abs()
        rtol = RTOL[a.dtype] * FACTOR.get(name, 1.0) * (FUSED_CUDA_FACTOR if fused else 1.0)
        return float(error.max() / scale), bool((error <= rtol * scale).all())
    eps = torch.finfo(a.dtype).eps
    af, bf = a.float(), b.float()
    if bound == "rounding":
        steps = float((af - bf).abs().max() / (eps * bf.abs().max()).clamp_min(1e-30))
        return steps, steps <= STEPS
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
    """Steps ``check`` and its reference, 16-bit matrix products summed in float32
    (`products_summed_in_float32`); (reference used, worst difference, passed, elements
    not bit-identical as "k of n")."""
    with products_summed_in_float32():
        return _parity(check, device)


@contextlib.contextmanager
def products_summed_in_float32():
    """bfloat16 and float16 matrix products on CUDA with every partial sum in float32,
    as on the CPU: by default torch lets cuBLAS add split-K partial sums in 16 bits
    (``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` and its
    float16 twin). Muon's Newton–Schulz multiplies in bfloat16; emulated on gpu_check's
    data, such 16-bit partial sums put 2.0-4.8% of a float16 parameter's elements a step
    from our CPU step's (bfloat16: 1.7 steps), where float32 sums in another order put at
    most 0.76% (bench/NOTES.md entry 32): the check's allowance of 1% then measures our
    kernels, not cuBLAS's choice of reduction."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_bf16_reduced_precision_reduction,
             matmul.allow_fp16_reduced_precision_reduction)  # fmt: skip
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved[0]
        matmul.allow_fp16_reduced_precision_reduction = saved[1]


def _parity(check, device):
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
    apart = bits_apart(mine, wanted)
    if "kahan_sum" in check.extra and bound != "bits":
        mine, wanted = kahan_sums(mine), kahan_sums(wanted)
    worst = Worst()
    for key, value in wanted.items():
        if key not in mine:
            continue  # torch's keys we do not keep, e.g. a fused step's tensors
        worst.add(key, *compare(mine[key], value, bound, check.name, used))
    if "master_weights" in check.extra:  # the parameter is its float32 copy rounded, bit for bit
        for index, p in enumerate(params):
            copy = ours.state[p]["master_param"]
            worst.add(f"p{index} vs master_param", 0.0, torch.equal(p.detach(), copy.to(p.dtype)))
    return used, worst.text, worst.passed, apart


def kahan_sums(named):
    """``named`` (`tensors`) with each Kahan compensation ``pN.kahan_comp`` replaced by
    ``pN+kahan_comp``, the float32 value the pair holds. Compared alone, a compensation
    is the parameter's rounding error: where two steps round the parameter to adjacent
    16-bit values (LAMB's norms summed in another order), it differs by a whole step of
    the parameter, while the value the pair holds differs by ~1e-6 (emulated: NOTES 31)."""
    out = {}
    for key, value in named.items():
        if key.endswith(".kahan_comp"):
            param = key.removesuffix(".kahan_comp")
            out[f"{param}+kahan_comp"] = named[param].detach().float() + value.float()
        else:
            out[key] = value
    return out


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


def listing():
    lines = ["| optimizer | row | mode | reference | bound |", "| --- | --- | --- | --- | --- |"]
    for check in checks():
        cells = [check.name, check.row, check.mode, reference_of(check), bound_of(check)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
