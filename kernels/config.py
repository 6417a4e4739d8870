"""Tuning knobs of the CUDA kernels, in one place (tests patch them small).

``THREADS_PER_BLOCK`` threads per block; at most ``BLOCKS_PER_SM`` blocks per
multiprocessor, each thread striding over the rest of the array (grid-stride loop).
``FORCE_CUDA`` (environment ``FASTMOMENTUM_FORCE_CUDA=1``) makes the torch optimizers
run the CUDA kernels on CPU tensors: with ``NUMBA_ENABLE_CUDASIM=1`` that is how the
tests drive the CUDA path end to end on a machine without a GPU.
"""

import os

THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 8
FORCE_CUDA = os.environ.get("FASTMOMENTUM_FORCE_CUDA") == "1"

_multiprocessors = None


def launch_shape(size):
    """``(blocks, threads_per_block)`` for a grid-stride loop over ``size`` elements."""
    global _multiprocessors
    if _multiprocessors is None:
        from numba import cuda

        device = cuda.get_current_device()
        # The simulator's device has no multiprocessor count; 2 keeps it small.
        _multiprocessors = getattr(device, "MULTIPROCESSOR_COUNT", 2)
    needed = -(-size // THREADS_PER_BLOCK)
    return max(1, min(needed, _multiprocessors * BLOCKS_PER_SM)), THREADS_PER_BLOCK
