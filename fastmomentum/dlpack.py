"""Zero-copy bridge from torch tensors to the arrays the kernels take (DLPack)."""

import numpy as np


def as_array(tensor):
    """A NumPy array sharing ``tensor``'s memory (CPU tensors)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"expected a CPU tensor, got one on {tensor.device}")
    return np.from_dlpack(tensor.detach())
