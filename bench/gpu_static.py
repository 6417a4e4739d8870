"""Static checks of every CUDA kernel, without a GPU: registers, occupancy, spills,
float64 instructions, vector loads and stores and bytes in flight, for sm_80 and sm_90.

    python -m bench.gpu_static [--output bench/results] [--strict] [--record-below-target]

Needs the ``cuda-dev`` extra (``pip install -e '.[cuda-dev]'``: numba-cuda with NVVM,
and NVIDIA's ``ptxas`` from the ``nvidia-cuda-nvcc-cu12`` wheel); no GPU and no driver.
Every kernel a launch can compile (`variants`: each spec of `kernels.rules.SPECS` over
each parameter and state format the torch binding and the low-level functions launch,
and each 8-bit variant) is compiled to PTX by numba-cuda for each architecture of
`ARCHS`, and assembled by ``ptxas -v``. The table (``gpu_static.md`` and ``.json``
under ``--output``) has per kernel, format and architecture:

- registers per thread (with the limit ptxas was given, where a launch gives one:
  `kernels.cuda.fitted`) and the blocks of the launch's threads (`threads_per_block`: 256,
  64 over 8-bit state) resident per SM (`blocks_per_sm`), with the occupancy they give;
- spills and local memory (bytes per thread, from ``ptxas -v``), shared memory;
- f64: float64 instructions in the PTX; unrounded: float sums and products ptxas may
  fuse (`unrounded`); vector: ``ld.global.v2``/``.v4`` loads;
- in flight: `bytes_in_flight` per thread, times the resident threads per SM.

The command exits 1 when a kernel spills, when a kernel whose arrays are not float64
has a float64 instruction other than those of LAMB's float64 sums of squares
(`unexpected_f64`), when a kernel has a float sum or product without a rounding mode
(which ptxas may fuse: NVVM compiles the kernels without contraction,
`kernels.contraction`), when an element-wise kernel (not over 8-bit block-wise state)
has no vector load or no vector store, or when a kernel is below its architecture's
bytes-in-flight target (`Arch.target`) and is not in `BELOW_TARGET_FILE`, the known
misses that issue 22 point 4 (the kernels' shape) is to remove; a known miss that now
meets the target fails too, until its line is removed (``--record-below-target``
rewrites the file from the run). ``--strict`` fails on every miss, known or not. docs/gpu.md says
what each column means and how the target was chosen.
"""

import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import cli

#: The known kernels below the bytes-in-flight target, one ``kernel format arch`` a line.
BELOW_TARGET_FILE = cli.HERE / "gpu_static_below_target.txt"


class Arch(NamedTuple):
    """An architecture's limits per SM (CUDA C Programming Guide, "Compute Capabilities"
    table) and the memory of the device its bytes-in-flight target is set for."""

    name: str
    capability: tuple
    registers: int = 65536  # 32-bit registers per SM
    register_unit: int = 256  # registers are allocated per warp, in units of 256
    max_threads: int = 2048
    max_blocks: int = 32
    shared: int = 0  # bytes of shared memory per SM (the largest carve-out)
    reserved_shared: int = 1024  # bytes the system reserves per block (sm_80 and later)
    device: str = ""
    bandwidth: float = 0.0  # bytes per second (the datasheet's peak)
    multiprocessors: int = 0
    latency: float = 700e-9  # seconds a DRAM load takes under load (assumed; see target)

    @property
    def target(self):
        """Bytes in flight per SM that keep the device's memory busy (Little's law:
        bandwidth × latency, shared by its SMs)."""
        return self.bandwidth * self.latency / self.multiprocessors


ARCHS = (
    Arch("sm_80", (8, 0), shared=164 * 1024, device="A100 80GB SXM", bandwidth=2.039e12,
         multiprocessors=108),
    Arch("sm_90", (9, 0), shared=228 * 1024, device="H200 SXM", bandwidth=4.8e12,
         multiprocessors=132),
)  # fmt: skip


class Format(NamedTuple):
    """The element formats a launch table is compiled for (`kernels.tables.TensorTable`):
    the compute dtype (coefficients, entry values) and the param, grad, state and
    companion element types (16-bit floats as their integer carriers)."""

    name: str
    compute: str
    formats: tuple
    param_store: int = 0  # how its usual launch stores parameters (`kernels.tables`)


_F32, _F64 = "float32", "float64"
_BF16, _FP16 = "uint16", "int16"  # `kernels.precision.BFLOAT16_BITS`, `FLOAT16_BITS`
_MIRRORED = 1  # `kernels.tables.MIRRORED` (imported late: kernels needs numba)

#: What `fastmomentum.bucket.compute_dtype_and_formats` (and `kernels.calls.one_entry`)
#: make of each parameter dtype and ``state_dtype``; `Kahan` and stochastic rounding
#: take the same types (``param_store`` is a kernel argument), master weights step the
#: float32 copy and round into the 16-bit parameter (the companion).
FORMATS = (
    Format("fp32", _F32, (_F32, _F32, _F32, _F32)),
    Format("fp64", _F64, (_F64, _F64, _F64, _F64)),
    Format("bf16", _F32, (_BF16, _BF16, _BF16, _BF16)),
    Format("fp16", _F32, (_FP16, _FP16, _FP16, _FP16)),
    Format("fp32, bf16 state", _F32, (_F32, _F32, _BF16, _F32)),
    Format("bf16, master", _F32, (_F32, _BF16, _F32, _BF16), _MIRRORED),
    Format("fp16, master", _F32, (_F32, _FP16, _F32, _FP16), _MIRRORED),
)
#: Block-wise 8-bit state: the state format is that of its absmax (float32).
INT8_FORMATS = (
    Format("fp32, int8 state", _F32, (_F32, _F32, _F32, _F32)),
    Format("bf16, int8 state", _F32, (_BF16, _BF16, _F32, _BF16)),
    Format("fp16, int8 state", _F32, (_FP16, _FP16, _F32, _FP16)),
)


class Variant(NamedTuple):
    """One kernel a launch compiles: ``spec``'s for a table of ``format``, with ``flags``,
    the values of ``spec.flags`` (constants of the kernel: `kernels.cuda.kernel`)."""

    spec: object
    format: Format
    flags: tuple

    @property
    def name(self):
        """The spec's name and each path flag that is set: ``rmsprop+centered``."""
        chosen = (f for f, value in zip(self.spec.flags, self.flags) if value)
        return "+".join([self.spec.name, *(f for f in chosen if _named_type(f) is None)])


#: Flags that name an element type rather than a path (LAMB's ``bfloat16_state``, Muon's
#: ``float16_param``): ``<type>_<column>``, set where that column of the table has it.
_TYPE_FLAG = re.compile(r"^(bfloat16|float16)_(param|state)$")


def _named_type(flag):
    """``(carrier, column)`` of a flag that names an element type, else None."""
    found = _TYPE_FLAG.match(flag)
    if found is None:
        return None
    return {"bfloat16": _BF16, "float16": _FP16}[found[1]], {"param": 0, "state": 2}[found[2]]


def flag_values(spec, format):
    """The values of ``spec.flags`` a launch over ``format`` passes: every combination of
    those that choose a path (``amsgrad``, ``nesterov``, ``centered``), and those that
    name an element type as ``format`` has it (Muon's ``bfloat16_param`` only where the
    parameter is stored to nearest, as `fastmomentum.muon` sets it)."""
    choices = []
    for flag in spec.flags:
        named = _named_type(flag)
        if named is None:
            choices.append((False, True))
            continue
        carrier, column = named
        nearest = column != 0 or format.param_store == 0
        choices.append((nearest and format.formats[column] == carrier,))
    return list(itertools.product(*choices))


def variants():
    """Every kernel a launch compiles (`Variant`): each spec of `kernels.rules.SPECS` and
    `kernels.rules.DEVICE_SPECS` in each of `FORMATS`, its capturable variant
    (`kernels.capturable.capturable`) where it has one, and its 8-bit variant
    (`kernels.specs.int8_blockwise`) in each of `INT8_FORMATS` where it has one, each
    with every value of its flags (`flag_values`)."""
    from kernels import rules
    from kernels.capturable import capturable
    from kernels.specs import int8_blockwise

    found = []
    for spec in (*rules.SPECS, *rules.DEVICE_SPECS):
        pairs = [(spec, format) for format in FORMATS]
        if spec.live is not None:
            pairs += [(capturable(spec), format) for format in FORMATS]
        try:
            blockwise = int8_blockwise(spec)
        except ValueError:  # no 8-bit state (SGD without momentum): never launched so
            blockwise = None
        if blockwise is not None:
            pairs += [(blockwise, format) for format in INT8_FORMATS]
        for kind, format in pairs:
            found += [Variant(kind, format, flags) for flags in flag_values(kind, format)]
    return found


def threads_per_block(spec):
    """The threads of ``spec``'s launches (`kernels.cuda.launch`): a warp per block of
    8-bit state (`kernels.cuda_blockwise.launch_shape`)."""
    from kernels import config, cuda_blockwise

    return cuda_blockwise.launch_shape()[1] if spec.blockwise else config.THREADS_PER_BLOCK


def signature(spec, format):
    """The Numba types of the arguments `kernels.cuda._launch` passes ``spec``'s kernel
    for a table of ``format`` (host arrays type as the device arrays uploaded from them)."""
    import numba

    from kernels import config, cuda_blockwise, hyperparameters
    from kernels.tables import TensorTable

    compute = np.dtype(format.compute)
    width = 2 + len(spec.state) * (2 if spec.blockwise else 1) + 1  # + the companion
    width += len(spec.scalars) if spec.capturable else 0
    table = TensorTable([1], width, compute, spec.entry_width, format.formats)
    coefficients = hyperparameters.in_dtype(compute, [0.0] * len(spec.coefficients._fields))
    arguments = [
        table.addresses,
        table.cuda_segments(
            cuda_blockwise.launch_shape()[0] if spec.blockwise else config.cuda_chunk()
        ),
        table.entry_values,
        coefficients,
        table.formats,
        table.clear_grads,
        table.param_store,
        *(
            (False, tuple(table.entry_values[0, : spec.entry_coefficient_count]))
            if spec.entry_coefficient_count
            else ()
        ),
    ]
    if spec.squares:  # partial sums, sums per entry, finished segments (`kernels.sums`)
        sums = np.zeros((1, len(spec.squares)))
        arguments += [sums, sums, np.zeros(1, np.int32)]
    if spec.from_sums is not None:
        arguments.append(np.zeros((1, 2)))
    if spec.capturable:  # `kernels.capturable.LiveInputs` (a float lr), finished segments
        settings = hyperparameters.in_dtype(np.float64, [0.0] * len(spec.live_settings._fields))
        arguments += [settings, np.float64(0), 0, 0, 0, np.float32(0)]
        arguments += [] if spec.squares else [np.zeros(1, np.int32)]  # else the sums' count
    return tuple(numba.typeof(argument) for argument in arguments)


@contextmanager
def compute_capability(capability):
    """Compile device functions for ``capability`` with no GPU or driver.

    numba-cuda compiles the functions a kernel calls (each rule, `kernels.precision`'s
    conversions) for the current device's compute capability, which it asks the
    driver for, even under ``compile_ptx(cc=...)``: here the device is a stand-in that
    has only that capability. Their LLVM IR is linked into the kernel's, which NVVM
    compiles for the kernel's ``cc``."""
    from numba.cuda import dispatcher

    class Device:
        compute_capability = capability

    original = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: Device
    try:
        yield
    finally:
        dispatcher.get_current_device = original


def compile_ptx(variant, arch, usual=False):
    """The PTX of ``variant``'s kernel (a `Variant`) on ``arch``; with ``usual``, of the
    kernel specialised to its usual launch (`usual_launch_source`)."""
    from numba import cuda

    from kernels import contraction
    from kernels import cuda as kernels

    spec, format = variant.spec, variant.format
    function = kernels.kernel(spec, variant.flags).py_func
    if usual:
        namespace = dict(function.__globals__)  # the module's, and its element step
        source = usual_launch_source(variant)
        exec(compile(source, f"<{spec.name}, usual launch>", "exec"), namespace)
        function = namespace[function.__name__]
    with compute_capability(arch.capability), contraction.uncontracted():  # as launched
        ptx, _ = cuda.compile_ptx(function, signature(spec, format), cc=arch.capability)
    return ptx


def fitted(ptx, arch, executable, limit):
    """``(resources, limit)`` of ``ptx`` as a launch compiles it (`kernels.cuda.fitted`):
    assembled as it is, and assembled again within ``limit`` registers a thread where it
    takes more, kept where that does not spill (``limit`` None otherwise)."""
    resources = parse_ptxas(assemble(ptx, arch, executable))
    if limit is not None and resources.registers > limit:
        within = parse_ptxas(assemble(ptx, arch, executable, limit))
        if within.spill_stores + within.spill_loads + within.stack + within.local == 0:
            return within, limit
    return resources, None


def register_limit(variant):
    """`kernels.cuda.register_limit` of ``variant``'s kernel over its format's tables."""
    from kernels import cuda as kernels

    formats = tuple(np.dtype(kind).type(0) for kind in variant.format.formats)
    return kernels.register_limit(variant.spec, variant.flags, formats)


def usual_launch_source(variant):
    """`kernels.cuda.kernel_source` of ``variant`` (a `Variant`) with the arguments that
    choose a path made constants as a constructor's defaults set them: gradients not
    cleared, and ``format.param_store``. NVVM then compiles only the path such a launch
    runs, whose loads `bytes_in_flight` counts (the kernel itself has the loads of every
    path, of which no launch runs all: Kahan and stochastic rounding)."""
    from kernels import cuda as kernels

    source = kernels.kernel_source(variant.spec, variant.flags)
    definition, _, body = source.partition(":\n")
    constants = ["    clear = False", f"    param_store = {variant.format.param_store}"]
    return definition + ":\n" + "\n".join(constants) + "\n" + body


def ptxas():
    """The path of ``ptxas``: ``$PTXAS``, the ``nvidia-cuda-nvcc-cu12`` wheel's, or on PATH."""
    if os.environ.get("PTXAS"):
        return os.environ["PTXAS"]
    try:
        import nvidia.cuda_nvcc

        wheel = Path(next(iter(nvidia.cuda_nvcc.__path__))) / "bin" / "ptxas"
        if wheel.exists():
            return str(wheel)
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if found is None:
        raise SystemExit(
            "ptxas not found: pip install -e '.[cuda-dev]' (nvidia-cuda-nvcc-cu12), or "
            "set PTXAS to its path"
        )
    return found


def assemble(ptx, arch, executable, register_limit=None):
    """``ptxas -v``'s report (its standard error) on ``ptx`` for ``arch``, with at most
    ``register_limit`` registers a thread (as numba-cuda's ``max_registers`` asks)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        command = [executable, "-v", "--gpu-name", arch.name, "-o", os.devnull, str(source)]
        if register_limit is not None:
            command.append(f"--maxrregcount={register_limit}")
        run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch.name}:\n{run.stderr}")
    return run.stderr


class Resources(NamedTuple):
    """What ``ptxas -v`` reports of one kernel (bytes are per thread, shared per block)."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    local: int
    shared: int


def parse_ptxas(report):
    """`Resources` from ``ptxas -v``'s report on one kernel."""

    def number(pattern):
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    registers = re.search(r"Used (\d+) registers", report)
    if registers is None:
        raise ValueError(f"no register count in ptxas's report:\n{report}")
    return Resources(
        registers=int(registers.group(1)),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
        local=number(r"(\d+) bytes lmem"),
        shared=number(r"(\d+) bytes smem"),
    )


def blocks_per_sm(arch, registers, threads, shared=0):
    """Blocks of ``threads`` resident per SM of ``arch`` (the CUDA occupancy calculator's
    formula)::

        warps      = ⌈threads / 32⌉
        by_regs    = ⌊ ⌊registers_per_SM / (⌈32·regs / 256⌉·256)⌋ / warps ⌋
        by_threads = ⌊max_threads / (32·warps)⌋
        by_shared  = ⌊shared_per_SM / (shared + 1 KB reserved)⌋   (if shared > 0)
        blocks     = min(by_regs, by_threads, by_shared, max_blocks)
    """
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // arch.register_unit) * arch.register_unit
    by_registers = (arch.registers // per_warp) // warps if registers else arch.max_blocks
    by_threads = arch.max_threads // (warps * 32)
    by_shared = arch.shared // (shared + arch.reserved_shared) if shared else arch.max_blocks
    return min(by_registers, by_threads, by_shared, arch.max_blocks)


# --- PTX ------------------------------------------------------------------------------

_REGISTER = re.compile(r"%[a-z]+[0-9]*(?:\.[xyz])?")
_WIDTHS = {"8": 1, "16": 2, "32": 4, "64": 8}


class Instruction(NamedTuple):
    opcode: str  # e.g. "ld.global.f32"
    written: tuple  # registers written
    read: tuple  # registers read (the address's among them)
    address: tuple  # registers of the address ([...]) of a load or store


def instructions(ptx):
    """The kernel body's instructions and labels (a label: ``Instruction(label, ...)``
    with an opcode ending in ``:``), in order. The body ends at the entry's closing brace
    (the first at a line's start): the functions it calls (libdevice's ``pow`` in the
    capturable kernels) follow it and reuse its register names."""
    body = ptx
    if ".entry" in ptx:
        body = ptx[ptx.index("{", ptx.index(".entry")) :]
        body = body[: body.index("\n}") + 1] if "\n}" in body else body
    found = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if not line or line.startswith((".", "{", "}", ")")):
            continue
        if line.endswith(":"):
            found.append(Instruction(line, (), (), ()))
            continue
        line = re.sub(r"^@!?%\w+\s+", "", line).rstrip(";")
        opcode, _, operands = line.partition(" ")
        if not operands.strip() or opcode.startswith("."):
            found.append(Instruction(opcode, (), (), ()))
            continue
        address = re.findall(r"\[([^\]]*)\]", operands)
        address = tuple(_REGISTER.findall(" ".join(address)))
        stores = opcode.startswith(("st.", "atom.", "red.", "bra", "bar"))
        if stores:
            written, read = (), tuple(_REGISTER.findall(operands))
        else:  # the first operand (or vector {...}) is written, the rest read
            first, rest = _split_first(operands)
            written, read = tuple(_REGISTER.findall(first)), tuple(_REGISTER.findall(rest))
        found.append(Instruction(opcode, written, read, address))
    return found


def _split_first(operands):
    operands = operands.strip()
    if operands.startswith("{"):
        end = operands.index("}") + 1
        return operands[:end], operands[end:]
    first, _, rest = operands.partition(",")
    return first, rest


def _is_memory_load(opcode):
    """A load from global memory: ``ld.global…`` or a generic ``ld`` (not param, shared,
    local or const)."""
    parts = opcode.split(".")
    if parts[0] not in ("ld", "ldu"):
        return False
    return not {"param", "shared", "local", "const"} & set(parts[1:])


def load_bytes(opcode):
    """Bytes one thread loads with ``opcode`` (``ld.global.v4.f32``: 16)."""
    parts = opcode.split(".")
    width = next(_WIDTHS[p[1:]] for p in reversed(parts) if p[1:] in _WIDTHS)
    return width * _vector(opcode)


def _vector(opcode):
    """Elements of a vector access (``ld.global.v4.f32``: 4), else 1."""
    return next((int(p[1:]) for p in opcode.split(".") if p in ("v2", "v4", "v8")), 1)


def _flows(found):
    """Per register, whether its value derives from a kernel parameter, from a value
    loaded from global memory, and from the thread's index (``%tid``). A predicate is
    no source: ``selp`` of two table pointers on a flag is a table pointer."""
    param, loaded, varying = set(), set(), set()
    changed = True
    while changed:  # to a fixed point: loop-carried values flow back through ``mov``
        before = (len(param), len(loaded), len(varying))
        for instruction in found:
            opcode, written = instruction.opcode, instruction.written
            read = [r for r in instruction.read if not r.startswith("%p")]  # not predicates
            if not written:
                continue
            if opcode.startswith("ld.param"):
                param.update(written)
            elif _is_memory_load(opcode):
                loaded.update(written)
            else:
                if any(r in param for r in read):
                    param.update(written)
                if any(r in loaded for r in read):
                    loaded.update(written)
            if any(r in varying or r.startswith("%tid") for r in read):
                varying.update(written)
        changed = (len(param), len(loaded), len(varying)) != before
    return param, loaded, varying


def element_loads(found):
    """The indices in ``found`` of loads of array elements: from an address that derives
    from an address the launch table holds (a value loaded from memory) and from no
    kernel parameter (the table's own arrays are parameters), and that differs from
    thread to thread (``%tid``: not a broadcast such as an 8-bit block's absmax)."""
    param, loaded, varying = _flows(found)
    chosen = set()
    for index, instruction in enumerate(found):
        if not _is_memory_load(instruction.opcode):
            continue
        address = instruction.address
        if any(r in param for r in address):
            continue
        if any(r in loaded for r in address) and any(r in varying for r in address):
            chosen.add(index)
    return chosen


def _ends_run(opcode):
    """Whether loads after ``opcode`` cannot be issued before it: a label or branch (the
    end of a basic block), a store or atomic to global or generic memory (the arrays of
    an entry may alias, so a later load may read what it wrote), a barrier."""
    if opcode.endswith(":") or opcode.split(".")[0] in ("bra", "ret", "exit", "bar", "call"):
        return True
    parts = opcode.split(".")
    if parts[0] in ("st", "atom", "red"):
        return not {"shared", "local", "param"} & set(parts[1:])
    return False


def bytes_in_flight(ptx):
    """Bytes of array elements one thread can have in flight: the most, over the runs of
    instructions between two of `_ends_run`, of the bytes of `element_loads` in a run.
    ptxas may issue every load of a run before its first use, not a load of the next
    run before a store or branch of this one."""
    found = instructions(ptx)
    chosen = element_loads(found)
    most = current = 0
    for index, instruction in enumerate(found):
        if _ends_run(instruction.opcode):
            current = 0
        elif index in chosen:
            current += load_bytes(instruction.opcode)
            most = max(most, current)
    return most


def global_stores(ptx):
    """``(vector, all)``: how many stores to global (or generic) memory the kernel's
    PTX has, and how many of them store a vector (``st.global.v4.f32``). The element loop
    loads and stores 16 bytes per array where aligned (one vector store per array the
    usual launch writes); a scalar store per element there would write a warp's 4 bytes
    at a 16-byte stride, four instructions where one would do."""
    stores = [
        i.opcode
        for i in instructions(ptx)
        if i.opcode.split(".")[0] == "st"
        and not {"shared", "local", "param"} & set(i.opcode.split(".")[1:])
    ]
    return sum(_vector(opcode) > 1 for opcode in stores), len(stores)


#: A float sum, difference or product with no rounding mode (``add.f32``, ``mul.f64``):
#: ptxas may fuse one with another into a multiply-add rounded once. NVVM without
#: contraction (`kernels.contraction`) writes each with ``.rn``, which ptxas keeps apart.
UNROUNDED = re.compile(r"^(?:add|sub|mul)(?:\.ftz)?(?:\.sat)?\.f(?:32|64)$")


def unrounded(ptx):
    """How many of the kernel's float sums and products ptxas may fuse (`UNROUNDED`)."""
    return sum(bool(UNROUNDED.match(i.opcode)) for i in instructions(ptx))


def f64_instructions(ptx):
    """The opcodes of the kernel's float64 instructions (an ``.f64`` in the opcode)."""
    return [i.opcode for i in instructions(ptx) if ".f64" in i.opcode]


#: What LAMB's float64 sums of squares compile to (`kernels.cuda.kernel_source`): a
#: float32 value widened, squared and added (in registers, in shared memory for 8-bit
#: state), then the sum stored or added atomically. None of these narrows a float64
#: back to 32 bits, so a float64 value the rule computed by mistake (which must reach a
#: float32 or 16-bit array through a ``cvt`` to it) is never among them.
SUMS_F64 = re.compile(
    r"^(cvt\.f64\.f32|(?:add|mul|fma)(?:\.rn)?\.f64|mov\.f64|ld\.shared\.f64|st\.shared\.f64"
    r"|st\.global\.f64|(?:atom|red)\.global\.add\.f64)$"
)


def unexpected_f64(spec, format, opcodes):
    """The float64 instructions of ``opcodes`` that ``spec``'s kernel for ``format``
    should not have: none for float64 arrays, or for a kernel that computes its
    coefficients per segment in float64 (capturable, `kernels.capturable`; from the
    sums on the device, `kernels.sums`: its element code is the spec's ordinary
    kernel's, held to this rule in its own row); else all but `SUMS_F64`'s for a spec
    with sums of squares, and all for any other."""
    if format.compute == _F64 or spec.capturable or spec.from_sums is not None:
        return []
    if spec.squares:
        return [opcode for opcode in opcodes if not SUMS_F64.match(opcode)]
    return list(opcodes)


# --- the table ------------------------------------------------------------------------


def measure(variant, arch, executable):
    """One row of the table: ``variant``'s kernel (a `Variant`) on ``arch``."""
    spec, format = variant.spec, variant.format
    ptx = compile_ptx(variant, arch)
    resources, limit = fitted(ptx, arch, executable, register_limit(variant))
    threads = threads_per_block(spec)
    blocks = blocks_per_sm(arch, resources.registers, threads, resources.shared)
    usual = compile_ptx(variant, arch, usual=True)
    per_thread = bytes_in_flight(usual)
    vector_stores, stores = global_stores(usual)
    opcodes = f64_instructions(ptx)
    vector = sum(_is_memory_load(i.opcode) and _vector(i.opcode) > 1 for i in instructions(ptx))
    return {
        "kernel": variant.name,
        "format": format.name,
        "arch": arch.name,
        "registers": resources.registers,
        "register_limit": limit,  # given to ptxas (`fitted`), or None
        "threads": threads,
        "blocks_per_sm": blocks,
        "occupancy": blocks * threads / arch.max_threads,
        "spill_bytes": resources.spill_stores + resources.spill_loads,
        "local_bytes": max(resources.stack, resources.local),
        "shared_bytes": resources.shared,
        "f64": len(opcodes),
        "unrounded": unrounded(ptx),
        "unexpected_f64": sorted(set(unexpected_f64(spec, format, opcodes))),
        "element_wise": not spec.blockwise,  # which should load and store vectors
        "vector_loads": vector,
        "vector_stores": vector_stores,  # of the usual launch's PTX
        "stores": stores,
        "in_flight_per_thread": per_thread,
        "in_flight_per_sm": per_thread * blocks * threads,
        "target": round(arch.target),
    }


@functools.cache
def _variants():
    return variants()


def _measured(task):
    """`measure` of ``(variant index, arch index, ptxas)``, in a worker process (indices:
    a rule does not pickle)."""
    index, arch, executable = task
    return measure(_variants()[index], ARCHS[arch], executable)


def key(row):
    return f"{row['kernel']} {row['format'].replace(' ', '')} {row['arch']}"


def known_below_target(path=BELOW_TARGET_FILE):
    """The keys (`key`) of `BELOW_TARGET_FILE`."""
    if not path.exists():
        return set()
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {" ".join(line.split()) for line in lines if line}


def failures(row, known, strict=False):
    """What fails in ``row``: a spill, an unexpected float64 instruction, an element-wise
    kernel without a vector load or without a vector store (its aligned path: issue 22
    point 4), a float sum or product without a rounding mode (`unrounded`; but with
    ``FASTMOMENTUM_CUDA_CONTRACTION=1``, which asks for them), a miss of the target that
    is not known (any, ``strict``), a known miss that no longer misses."""
    from kernels import config

    found = []
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} B")
    if row["unexpected_f64"]:
        found.append("f64: " + " ".join(row["unexpected_f64"]))
    if row["element_wise"] and not (row["vector_loads"] and row["vector_stores"]):
        found.append("no vector load or store")
    if row["unrounded"] and not config.CUDA_CONTRACTION:
        found.append(f"{row['unrounded']} sums or products ptxas may fuse")
    below = row["in_flight_per_sm"] < row["target"]
    if below and (strict or key(row) not in known):
        found.append("below target")
    if not below and key(row) in known:
        found.append(f"meets target: remove '{key(row)}' from {BELOW_TARGET_FILE.name}")
    return found


def status(row, known, strict=False):
    failed = failures(row, known, strict)
    if failed:
        return "FAIL: " + "; ".join(failed)
    return "below target (known)" if row["in_flight_per_sm"] < row["target"] else "ok"


def markdown(rows, known, strict, header):
    lines = [
        "# CUDA kernels, compiled without a GPU",
        "",
        "`python -m bench.gpu_static` (docs/gpu.md says what each column means). " + header,
        "",
        "| arch | target in flight / SM | device it is set for |",
        "| --- | --: | --- |",
    ]
    for arch in ARCHS:
        lines.append(f"| {arch.name} | {arch.target / 1024:.1f} KB | {arch.device} |")
    lines += [
        "",
        "| kernel | format | arch | registers | blocks/SM (occupancy) | spills B | local B "
        "| shared B | f64 | unrounded | vector loads | vector / all stores "
        "| in flight B/thread | in flight KB/SM | status |",
        "| --- | --- | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: "
        "| --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['kernel']} | {row['format']} | {row['arch']} | {_registers(row)} "
            f"| {row['blocks_per_sm']} ({row['occupancy']:.1%}) | {row['spill_bytes']} "
            f"| {row['local_bytes']} | {row['shared_bytes']} | {row['f64']} | {row['unrounded']} "
            f"| {row['vector_loads']} | {row['vector_stores']} / {row['stores']} "
            f"| {row['in_flight_per_thread']} "
            f"| {row['in_flight_per_sm'] / 1024:.1f} | {status(row, known, strict)} |"
        )
    return "\n".join(lines) + "\n"


def _registers(row):
    """The registers cell: the count, and the limit ptxas was given where it was."""
    limit = row.get("register_limit")
    return f"{row['registers']} (limit {limit})" if limit else str(row["registers"])


def versions():
    import numba
    import numba_cuda

    return {
        "python": sys.version.split()[0],
        "numba": numba.__version__,
        "numba-cuda": numba_cuda.__version__,
    }


def ptxas_version(executable):
    run = subprocess.run([executable, "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"release [\d.]+, V[\d.]+", run.stdout)
    return found.group(0) if found else run.stdout.strip().splitlines()[-1]


def main(argv=None):
    parser = cli.parser("bench.gpu_static", __doc__)
    cli.add_output(parser, "gpu_static.md and gpu_static.json")
    parser.add_argument(
        "--strict", action="store_true", help="fail on every kernel below target, known or not"
    )
    parser.add_argument(
        "--record-below-target",
        action="store_true",
        help=f"rewrite {BELOW_TARGET_FILE.name} with the kernels below target in this run",
    )
    parser.add_argument("--only", help="kernels whose name contains this (a quick look)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count(),
        help="processes compiling (default: a core each)",
    )
    args = parser.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
        raise SystemExit("bench.gpu_static compiles for real GPUs: unset NUMBA_ENABLE_CUDASIM")
    executable = ptxas()
    started = time.perf_counter()
    chosen = [k for k, variant in enumerate(variants()) if (args.only or "") in variant.name]
    tasks = [(k, a, executable) for k in chosen for a in range(len(ARCHS))]
    rows = []
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for row in pool.map(_measured, tasks):
            rows.append(row)
            print(f"{key(row):48} {row['registers']:4} registers", flush=True)
    seconds = time.perf_counter() - started
    if args.record_below_target:
        misses = sorted(key(row) for row in rows if row["in_flight_per_sm"] < row["target"])
        BELOW_TARGET_FILE.write_text(
            "# Kernels below the bytes-in-flight target of bench.gpu_static (kernel format\n"
            "# arch), written by --record-below-target: issue 22 point 4 removes them.\n"
            + "".join(f"{miss}\n" for miss in misses)
        )
    known = known_below_target()
    tools = {**versions(), "ptxas": ptxas_version(executable)}
    header = (
        ", ".join(f"{name} {version}" for name, version in tools.items())
        + f"; {len(rows)} kernels compiled in {seconds:.0f} s."
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "gpu_static.md").write_text(markdown(rows, known, args.strict, header))
    report = {"versions": tools, "seconds": seconds, "archs": [a._asdict() for a in ARCHS]}
    (args.output / "gpu_static.json").write_text(json.dumps({**report, "rows": rows}, indent=1))
    failed = [(key(row), failures(row, known, args.strict)) for row in rows]
    failed = [(name, reasons) for name, reasons in failed if reasons]
    below = sum(row["in_flight_per_sm"] < row["target"] for row in rows)
    print(f"\n{len(rows)} kernels in {seconds:.0f} s; {below} below the bytes-in-flight target")
    print(f"table in {args.output / 'gpu_static.md'}")
    for name, reasons in failed:
        print(f"FAIL {name}: {'; '.join(reasons)}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
