"""What a step needs from the other ranks of a sharded (FSDP2) parameter."""

import numpy as np
import torch


def summed_over_shards(params, sums):
    """Per-parameter sums over each DTensor's whole tensor: ``sums`` (float64, a row per
    parameter of ``params``) hold this rank's shard's; each row is added up over the
    mesh dimensions its parameter is sharded on (one ``all_reduce`` per mesh and set of
    sharded dimensions, never one per parameter). Rows of replicated or plain tensors
    are returned as they are. Every rank must call this with the same parameters."""
    groups = _sharded(params)
    if not groups:
        return sums
    sums = np.array(sums, np.float64)
    for mesh, dims, device, positions in groups.values():
        values = torch.from_numpy(sums[positions]).to(device)
        for dim in dims:
            torch.distributed.all_reduce(values, group=mesh.get_group(dim))
        sums[positions] = values.cpu().numpy()
    return sums


def summed_on_device(params, sums):
    """`summed_over_shards` of sums a CUDA launch kept on the GPU (a device array,
    `kernels.sums`), in place and without the host reading them: the rows are
    all-reduced as a torch tensor over the same memory. (In Numba's simulator, whose
    device arrays torch cannot view, through the host.)"""
    groups = _sharded(params)
    if not groups:
        return sums
    device = next(iter(groups.values()))[2]
    if device.type != "cuda":
        sums.copy_to_device(np.ascontiguousarray(summed_over_shards(params, sums.copy_to_host())))
        return sums
    tensor = torch.as_tensor(sums, device=device)
    for mesh, dims, _, positions in groups.values():
        rows = torch.tensor(positions, device=device)
        values = tensor.index_select(0, rows)
        for dim in dims:
            torch.distributed.all_reduce(values, group=mesh.get_group(dim))
        tensor.index_copy_(0, rows, values)
    return sums


def _sharded(params):
    """``(mesh, sharded dims, device, positions)`` per mesh and set of sharded dims."""
    from torch.distributed.tensor import Shard

    groups = {}
    for position, param in enumerate(params):
        dims = tuple(d for d, kind in enumerate(param.placements) if isinstance(kind, Shard))
        if dims:
            key = (id(param.device_mesh), dims)
            if key not in groups:
                groups[key] = (param.device_mesh, dims, param.to_local().device, [])
            groups[key][3].append(position)
    return groups
