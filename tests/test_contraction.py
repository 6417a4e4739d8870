"""`kernels.contraction`: NVVM compiles our CUDA kernels with ``-fma=0``.

Without NVVM here, numba-cuda's ``nvvm.compile_ir`` is a stand-in that records the
options it is given; `bench.gpu_static` (CI, with NVVM) checks the PTX itself: every
float sum and product of every kernel carries its rounding mode (``.rn``).
"""

import threading

import numpy as np
import pytest
import torch

import fastmomentum
from fastmomentum.kernels import config, contraction
from fastmomentum.kernels import cuda as kernels_cuda

nvvm = pytest.importorskip("numba.cuda.cudadrv.nvvm", reason="numba-cuda is not installed")


@pytest.fixture
def compiles(monkeypatch):
    """The options of each call of numba-cuda's ``nvvm.compile_ir`` (a stand-in)."""
    calls = []

    def compile_ir(llvmir, **options):
        calls.append(options)
        return "ptx"

    monkeypatch.setattr(nvvm, "compile_ir", compile_ir, raising=False)
    monkeypatch.setattr(config, "CUDA_CONTRACTION", False)
    return calls


def test_a_compile_inside_uncontracted_asks_nvvm_for_no_fma(compiles):
    nvvm.compile_ir("ir", opt=3)
    with contraction.uncontracted():
        nvvm.compile_ir("ir", opt=3)
        with contraction.uncontracted():  # nested: still inside on leaving it
            pass
        nvvm.compile_ir("ir", opt=3, fastmath=True)  # fastmath asks for contraction
        nvvm.compile_ir("ir", opt=3)
    nvvm.compile_ir("ir", opt=3)
    assert compiles == [
        {"opt": 3},
        {"opt": 3, "fma": False},
        {"opt": 3, "fastmath": True},
        {"opt": 3, "fma": False},
        {"opt": 3},
    ]


def test_compile_ir_is_wrapped_once(compiles):
    original = nvvm.compile_ir
    for _ in range(3):
        with contraction.uncontracted():
            pass
    assert nvvm.compile_ir.__wrapped__ is original


def test_another_threads_compile_keeps_nvvms_default(compiles):
    """Code of another thread compiling while ours does (a user's kernel) is untouched."""
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        nvvm.compile_ir("theirs")
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with contraction.uncontracted():
        inside.set()
        done.wait(10)
        nvvm.compile_ir("ours")
    thread.join()
    assert compiles == [{}, {"fma": False}]


def test_cuda_contraction_keeps_nvvms_default_and_another_source(compiles, monkeypatch):
    """``FASTMOMENTUM_CUDA_CONTRACTION=1``: NVVM's default, in kernels whose source (so
    Numba's cache file) is not the uncontracted kernels'."""
    uncontracted = contraction.source_note()
    monkeypatch.setattr(config, "CUDA_CONTRACTION", True)
    with contraction.uncontracted():
        nvvm.compile_ir("ir")
    assert compiles == [{}]
    assert contraction.source_note() != uncontracted
    assert all(note.startswith("# ") for note in (uncontracted, contraction.source_note()))


@pytest.mark.cudasim
def test_every_launch_compiles_inside_uncontracted(compiles, monkeypatch):
    """`kernels.cuda.fitted`, which compiles a launch's kernel first, and the launch
    itself (where a new signature compiles) run inside `uncontracted`: a step of Adam
    through the CUDA kernels (the simulator), each call of `fitted` recorded."""
    inside = []
    fitted = kernels_cuda.fitted

    def recording(*arguments):
        inside.append(getattr(contraction._compiling, "uncontracted", False))
        return fitted(*arguments)

    monkeypatch.setattr(kernels_cuda, "fitted", recording)
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    param = torch.nn.Parameter(torch.randn(37, generator=torch.Generator().manual_seed(0)))
    optimizer = fastmomentum.Adam([param], lr=1e-2)
    param.grad = torch.ones_like(param)
    before = param.detach().clone()
    optimizer.step()
    assert inside == [True]
    assert not np.array_equal(param.detach().numpy(), before.numpy())


@pytest.mark.cudasim
def test_a_launch_after_contraction_is_switched_on_runs_the_contracted_build(monkeypatch):
    """`fitted` decides once per launch kind and per `config.CUDA_CONTRACTION`: a step
    after the switch (as `bench.gpu_check --contraction on` makes it) launches the
    kernel compiled with contraction, not the one chosen before."""
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    monkeypatch.setattr(kernels_cuda, "_fitted", {})
    param = torch.nn.Parameter(torch.randn(37, generator=torch.Generator().manual_seed(0)))
    optimizer = fastmomentum.Adam([param], lr=1e-2)
    param.grad = torch.ones_like(param)
    builds = []
    for contracted in (False, True):
        monkeypatch.setattr(config, "CUDA_CONTRACTION", contracted)
        optimizer.step()
        builds.append(kernels_cuda.launched()[-1][-1])
    (spec, flags, *_), _ = kernels_cuda.launched()
    assert builds == [
        kernels_cuda._generated[spec, flags, None, contracted] for contracted in (False, True)
    ]
    assert builds[0] is not builds[1]
