"""Zero-copy views of torch tensors as the arrays the kernels take.

CPU tensors become NumPy arrays through DLPack; CUDA tensors become Numba device arrays
through the CUDA array interface, without synchronising: kernels are queued on torch's
current stream, behind the work that wrote the tensors.
"""

import numpy as np


def as_array(tensor):
    """A NumPy array (CPU) or Numba device array (CUDA) sharing ``tensor``'s memory."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return np.from_dlpack(tensor)
    if tensor.device.type == "cuda":
        from numba import cuda

        with cuda.gpus[tensor.device.index]:  # no context on another device
            return cuda.as_cuda_array(tensor, sync=False)
    raise ValueError(f"expected a CPU or CUDA tensor, got one on {tensor.device}")
