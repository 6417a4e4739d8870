"""What a step needs from the other ranks of a sharded (FSDP2) parameter."""

import numpy as np
import torch


def summed_over_shards(params, sums):
    """Per-parameter sums over each DTensor's whole tensor: ``sums`` (float64, a row per
    parameter of ``params``) hold this rank's shard's; each row is added up over the
    mesh dimensions its parameter is sharded on (one ``all_reduce`` per mesh and set of
    sharded dimensions, never one per parameter). Rows of replicated or plain tensors
    are returned as they are. Every rank must call this with the same parameters."""
    from torch.distributed.tensor import Shard

    groups = {}
    for position, param in enumerate(params):
        dims = tuple(d for d, kind in enumerate(param.placements) if isinstance(kind, Shard))
        if dims:
            key = (id(param.device_mesh), dims)
            if key not in groups:
                groups[key] = (param.device_mesh, dims, param.to_local().device, [])
            groups[key][3].append(position)
    if not groups:
        return sums
    sums = np.array(sums, np.float64)
    for mesh, dims, device, positions in groups.values():
        values = torch.from_numpy(sums[positions]).to(device)
        for dim in dims:
            torch.distributed.all_reduce(values, group=mesh.get_group(dim))
        sums[positions] = values.cpu().numpy()
    return sums
