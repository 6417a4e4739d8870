"""The library's CUDA kernels are compiled without floating-point contraction, so that a
GPU computes each rule as it is written, as the CPU loops and Numba's CUDA simulator
(the tests' reference) compute it: ``a·b + c`` a product and a sum, each rounded.

NVVM's default (``-fma=1``) fuses such a pair into one ``fma.rn``, rounded once, and
leaves the other products and sums without a rounding mode, which ptxas may fuse too.
On an H200 (bench/results/gpu_check_h200.md: 10 steps of each optimizer) that put about
half the elements of fp32 Adam's moments, SGD's momentum and Lion's ``exp_avg`` one ulp
from our CPU step's, which in 16-bit and 8-bit modes shows as rounding flips; the only
modes bit for bit were those with no product to fuse: bf16 Adam, whose rule writes each
multiply-add as `precision.fused_multiply_add` (torch's fused CPU step), and bf16
Adagrad, whose ``g·g`` is exact in float32. With ``-fma=0`` NVVM writes every product
and sum with its rounding mode (``mul.rn``, ``add.rn``), which ptxas keeps;
`precision.fused_multiply_add` is still one ``fma.rn``.
`bench.gpu_static` fails on a kernel with a product or sum left without one.

numba-cuda has no option for a kernel's NVVM flags: `uncontracted` makes every
compile on this thread inside it pass ``fma=False`` to numba-cuda's ``nvvm.compile_ir``
(wrapped once, on first use, where the CUDA target is imported; other code's kernels
compile as before). Every numba-cuda from 0.20, the oldest we take, to 0.30.4 calls it
through the module (``nvvm.compile_ir`` in ``numba/cuda/codegen.py``) and turns
``fma=False`` into ``-fma=0``; a version that stopped would compile with contraction
again, which `bench.gpu_static` reports once the ``[cuda-dev]`` pin reaches it.
`config.CUDA_CONTRACTION` (environment ``FASTMOMENTUM_CUDA_CONTRACTION=1``) keeps
NVVM's default, for comparison (``python -m bench.gpu_check --contraction on``). Each
choice is written into the kernel's source (`source_note`), so that Numba's disk cache
never serves a kernel compiled under the other.
"""

import contextlib
import threading

from . import config

_compiling = threading.local()  # .uncontracted: a compile on this thread inside `uncontracted`


def source_note():
    """The line a generated kernel's source starts with: how NVVM compiles it."""
    if config.CUDA_CONTRACTION:
        return "# NVVM fuses products and sums (FASTMOMENTUM_CUDA_CONTRACTION=1)\n"
    return "# NVVM compiles without contraction (-fma=0, kernels.contraction)\n"


@contextlib.contextmanager
def uncontracted():
    """NVVM compiles what is compiled on this thread inside with ``-fma=0`` (unless
    `config.CUDA_CONTRACTION`)."""
    if config.CUDA_CONTRACTION or not _wrapped():
        yield
        return
    outer = getattr(_compiling, "uncontracted", False)
    _compiling.uncontracted = True
    try:
        yield
    finally:
        _compiling.uncontracted = outer


def _wrapped():
    """Whether numba-cuda's ``nvvm.compile_ir`` is wrapped by `_compile_ir` (done here,
    once): False where numba-cuda has none (the simulator, which compiles nothing)."""
    try:
        from numba.cuda.cudadrv import nvvm
    except ImportError:
        return False
    compile_ir = getattr(nvvm, "compile_ir", None)
    if compile_ir is None:
        return False
    if not getattr(compile_ir, "keeps_products_apart", False):
        nvvm.compile_ir = _compile_ir(compile_ir)
    return True


def _compile_ir(compile_ir):
    """``compile_ir`` passing ``fma=False`` inside `uncontracted` (a fastmath compile
    asks for contraction, and keeps it)."""

    def wrapper(llvmir, **options):
        if getattr(_compiling, "uncontracted", False) and not options.get("fastmath"):
            options["fma"] = False
        return compile_ir(llvmir, **options)

    wrapper.keeps_products_apart = True
    wrapper.__wrapped__ = compile_ir
    return wrapper
