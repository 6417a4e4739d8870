"""Sums of squares per entry, kept on the GPU (LAMB's norms), and the launches that read them.

A launch of a spec with ``squares`` (`specs.KernelSpec.squares`) sums, per segment, the
squares of those values over the segment's elements: each thread's in its order, then
the block's by a tree in shared memory (`segment_totals`; block-wise 8-bit kernels add
their warps' in warp order, `kernels.cuda_blockwise`), which thread 0 stores in
``partials[segment]``. The block that finishes an entry's last segment (an atomic count
of finished segments per entry, ``done``, which that block resets) adds the entry's
partial sums up by the same tree, in segment order, and stores them in
``sums[entry]``: no copy to the host, no wait, and one order of additions at every
launch, so the same bits every time (atomic additions of each thread's sums, as
before, left the last bits to the order the threads came in). The partial sums are
read back by atomic additions of zero, which read the level of the cache every block
shares (another block's writes may not be in this block's L1).

A spec with ``from_sums`` (`specs.KernelSpec.from_sums`) takes such a ``sums`` array
and computes each segment's entry values from its entry's row (LAMB's update pass: its
trust ratio), so that the host never reads the norms.
"""

#: Shared float64 values for the reduction of an entry's partial sums: the most threads
#: a CUDA block has.
MOST_THREADS = 1024


def kernel_arguments(spec):
    """The arguments of ``spec``'s kernel after its flags, for its sums of squares and
    for the sums it reads (``from_sums``)."""
    arguments = ", partials, sums, done" if spec.squares else ""
    return arguments + (", sums" if spec.from_sums else "")


def prologue(spec):
    """Shared arrays before the grid-stride loop."""
    if not spec.squares:
        return []
    return [
        "    last_block = cuda.shared.array(1, int32)",
        f"    reduced = cuda.shared.array({MOST_THREADS}, float64)",
    ]


def segment_lines(spec, indent):
    """Lines at the start of a segment, after its entry values are read: its entry
    values computed from its entry's sums."""
    if not spec.from_sums:
        return []
    return [indent + "values = FROM_SUMS(values, sums, entry)"]


def segment_totals(spec, indent):
    """Lines after a segment's elements: each thread's sums (``sum0``, …) added up over
    the block by `_block_sum`, thread 0 storing them in ``partials[segment]``."""
    lines = []
    for k in range(len(spec.squares)):
        lines += [f"reduced[cuda.threadIdx.x] = sum{k}", *_block_sum()]
        lines += ["if cuda.threadIdx.x == 0:", f"    partials[segment, {k}] = reduced[0]"]
        lines.append("cuda.syncthreads()  # before the next sum reuses the shared values")
    return [indent + line for line in lines]


def _block_sum():
    """Lines that add up ``reduced[:blockDim.x]`` into ``reduced[0]``: a tree, element
    ``t`` adding ``t + width`` for widths of half the block down to 1 (threads per
    block, a power of two), so every launch adds in one order."""
    return [
        "cuda.syncthreads()",
        "width = cuda.blockDim.x // 2",
        "while width > 0:",
        "    if cuda.threadIdx.x < width:",
        "        reduced[cuda.threadIdx.x] += reduced[cuda.threadIdx.x + width]",
        "    cuda.syncthreads()",
        "    width //= 2",
    ]


def epilogue(spec, indent):
    """Lines after a segment's sums are in ``partials``: the block that finishes the
    entry's last segment adds them up into ``sums[entry]`` (module doc)."""
    if not spec.squares:
        return []
    lines = [
        "cuda.syncthreads()  # every thread's sums are in partials",
        "if cuda.threadIdx.x == 0:",
        "    cuda.threadfence()",
        "    finished = cuda.atomic.add(done, entry, 1)",
        "    last_block[0] = 1 if finished == segments[segment, 3] - 1 else 0",
        "cuda.syncthreads()",
        "if last_block[0] == 1:",
        "    earliest, count = segments[segment, 4], segments[segment, 3]",
    ]
    for k in range(len(spec.squares)):
        lines += [
            "    total = 0.0",
            "    for s in range(earliest + cuda.threadIdx.x, earliest + count, cuda.blockDim.x):",
            f"        total += cuda.atomic.add(partials, (s, {k}), 0.0)",
            "    reduced[cuda.threadIdx.x] = total",
            *("    " + line for line in _block_sum()),
            "    if cuda.threadIdx.x == 0:",
            f"        sums[entry, {k}] = reduced[0]",
            "    cuda.syncthreads()  # before the next sum reuses the shared values",
        ]
    lines += ["    if cuda.threadIdx.x == 0:", "        done[entry] = 0"]
    return [indent + line for line in lines]
