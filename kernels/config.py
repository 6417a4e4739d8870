"""Tuning knobs of the kernels, in one place (tests patch them small).

CUDA: ``THREADS_PER_BLOCK`` threads per block, each block stepping segments of at most
``ITEMS_PER_THREAD`` elements per thread; at most ``BLOCKS_PER_SM`` blocks per
multiprocessor, each block striding over the remaining segments (grid-stride loop).
``FORCE_CUDA`` (environment ``FASTMOMENTUM_FORCE_CUDA=1``) makes the torch optimizers
run the CUDA kernels on CPU tensors: with ``NUMBA_ENABLE_CUDASIM=1`` that is how the
tests drive the CUDA path end to end on a machine without a GPU. ``CUDA_CONTRACTION``
(environment ``FASTMOMENTUM_CUDA_CONTRACTION=1``): NVVM's fused multiply-adds, for
comparison (`kernels.contraction`).
"""

import os

THREADS_PER_BLOCK = 256
# Several waves at any occupancy: 2 to 6 blocks of 256 threads are resident per SM, by
# the kernel's registers (float32 Adam 72-78: 3; bench/results/gpu_static.md).
BLOCKS_PER_SM = 32
ITEMS_PER_THREAD = 16  # a segment of 4096 elements: as torch's multi-tensor kernels, a few
# thousand per block keeps the per-segment bookkeeping negligible
# Bytes of each array a CUDA thread loads before it stores its first element (of the
# widest array: 4 float32 elements, 8 of 16 bits, 2 float64), in flight together: one
# vector load per array where a segment's arrays are aligned to it, else scalar loads
# (`kernels.cuda._element_loop`; bench.gpu_static counts them per SM against a target).
BYTES_IN_FLIGHT_PER_ARRAY = 16
# Bytes of loads a multiprocessor keeps in flight to keep the memory busy (Little's law:
# an H200's 4.8 TB/s × 700 ns over its 132 SMs, bench.gpu_static's sm_90 target). A
# kernel whose registers leave fewer blocks per SM than hold this many, of the 64 Ki
# 32-bit registers of an SM (sm_80, sm_90), is compiled again within a register limit
# (`kernels.cuda.fitted`).
BYTES_IN_FLIGHT_PER_SM = 25_455
REGISTERS_PER_SM = 65_536
# Block-wise 8-bit state (`kernels.cuda_blockwise`): a warp per block of state (8
# elements a thread), BLOCKWISE_WARPS warps per CUDA block (a power of two), as many
# blocks of state per segment.
BLOCKWISE_WARPS = 2
FORCE_CUDA = os.environ.get("FASTMOMENTUM_FORCE_CUDA") == "1"
# NVVM fuses the CUDA kernels' products and sums (its default, -fma=1) only with
# FASTMOMENTUM_CUDA_CONTRACTION=1: by default each is rounded, as on the CPU
# (`kernels.contraction`).
CUDA_CONTRACTION = os.environ.get("FASTMOMENTUM_CUDA_CONTRACTION") == "1"

#: CPU kernels run single-threaded below this many elements in a launch (see
#: `kernels.cpu._compiled`).
CPU_SERIAL_BELOW = 1 << 14  # 64 KiB per float32 array: a single core streams less from DRAM

_multiprocessors = {}  # per device id


def multiprocessors():
    """The current device's multiprocessor count (2 for the simulator, which has none)."""
    from numba import cuda

    device = cuda.get_current_device()
    key = getattr(device, "id", 0)
    if key not in _multiprocessors:
        _multiprocessors[key] = getattr(device, "MULTIPROCESSOR_COUNT", 2)
    return _multiprocessors[key]


def cuda_chunk():
    """Elements of one CUDA segment (one block's share at a time)."""
    return THREADS_PER_BLOCK * ITEMS_PER_THREAD


def launch_shape(segments):
    """``(blocks, threads_per_block)`` for a grid-stride loop over ``segments`` segments."""
    return max(1, min(segments, multiprocessors() * BLOCKS_PER_SM)), THREADS_PER_BLOCK
