"""Steps that read nothing from the host which changes between steps (``capturable``).

A CUDA graph replays the kernel launches it captured with the arguments they had then;
a step that takes its bias corrections, learning rate or loss scale as launch arguments
would replay them unchanged. The `capturable` variant of a `specs.KernelSpec` therefore
reads, on the device, everything a step changes:

- each entry's scalar state (``spec.scalars``: its step count), one float at an address
  in the launch table after the state columns, which it advances;
- the learning rate, from a tensor's address (``lr_at``; 0: the float ``lr``);
- AMP's loss scale and ``found_inf`` (``torch.amp.GradScaler``), from their addresses
  (0: none). With ``found_inf`` set nothing steps and no count advances; the gradients
  are still zeroed when the launch clears them (``fused_zero_grad``).

Per segment, thread 0 computes the rule's coefficients with ``spec.live`` in float64
(from the entry's counts, the lr, ``1/scale`` and the host's fixed ``settings``) into
shared memory, rounded to the table's dtype as the host rounds them, so the step's
numbers are those of the ordinary launch. The entry's counts are written back by the
block that finishes its last segment (an atomic count of finished segments per entry,
``done``, which that block resets), so every segment of an entry reads the count from
before the step.

What must not change between replays, as for ``torch.optim``'s capturable optimizers:
the tensors' addresses (a graph's memory pool keeps them), the launch table (`kernels.cuda`
copies nothing while a stream is capturing) and the host's float hyperparameters.
"""

import functools
from typing import NamedTuple

import numpy as np
from numba import types
from numba.extending import overload


class LiveInputs(NamedTuple):
    """What a capturable launch reads besides its table: ``settings``, the rule's
    hyperparameters fixed on the host (a tuple of floats, `specs.KernelSpec.live`);
    the learning rate ``lr`` (a float, used when ``lr_at`` is 0) or the address
    ``lr_at`` of one of lr's dtype (``lr``'s own); the addresses of the AMP loss scale
    ``scale_at`` and of ``found_at`` (float32 each; 0: none); ``scalar_like``, a zero
    of the scalar state's dtype."""

    settings: tuple
    lr: float
    lr_at: int = 0
    scale_at: int = 0
    found_at: int = 0
    scalar_like: object = np.float32(0)


@functools.cache
def capturable(spec):
    """``spec`` computing its coefficients on the device (module doc); one object per
    ``spec``. Raises ``ValueError`` for a spec without ``live`` or with 8-bit state."""
    if spec.live is None:
        raise ValueError(f"{spec.name} has no live coefficients: it cannot be capturable")
    if spec.blockwise:
        raise ValueError(f"{spec.name}: capturable steps over 8-bit state are not written")
    return spec._replace(name=f"{spec.name}_capturable", capturable=True)


def placeholder_coefficients(spec, dtype):
    """The host's coefficients argument of a capturable launch: zeros of ``dtype`` (the
    kernel types on them and computes the values, `segment_lines`)."""
    return tuple(np.zeros(len(spec.coefficients._fields), dtype))


def scalar_column(spec, k):
    """The launch table column of ``spec.scalars[k]``'s address: after the state's."""
    return 2 + len(spec.state) + k


def same_type(value, like):
    """``value`` converted to ``like``'s type (in compiled code, as in Python)."""
    return type(like)(value)


@overload(same_type)
def _same_type(value, like):
    kind = like if isinstance(like, types.Number) else None
    if kind is None:
        return None
    return lambda value, like: kind(value)


def kernel_arguments(spec):
    """The arguments a capturable kernel takes after its sums' (`LiveInputs`, then the
    per-entry count of finished segments, unless the sums' count serves: `epilogue`)."""
    done = "" if spec.squares else ", done"
    return ", settings, lr, lr_at, scale_at, found_at, scalar_like" + done


def prologue(spec):
    """Lines before a capturable kernel's grid-stride loop: what every segment shares."""
    counts = len(spec.coefficients._fields), spec.live_entry_width, len(spec.scalars)
    return [
        "    like = coefficients[0]",
        "    skipped = found_at != 0 and pointer_to(found_at, float32(0))[0] != 0",
        f"    live_coefficients = cuda.shared.array({max(counts[0], 1)}, float64)",
        f"    live_entry = cuda.shared.array({max(counts[1], 1)}, float64)",
        f"    live_scalars = cuda.shared.array({max(counts[2], 1)}, float64)",
    ]


def coefficient_lines(spec, indent):
    """Lines at the start of a segment, before its arrays' pointers: thread 0 reads the
    lr and ``1/scale`` and computes the entry's coefficients and new scalar state into
    shared memory. Read here rather than once per kernel, and before the pointers, none
    of these float64 values is held in registers through the element loop, nor the
    pointers through this float64 code: that cost the capturable kernels up to 14
    registers, a block per SM for 102 of 266 (bench/NOTES.md entry 28)."""
    scalars = ", ".join(
        f"float64(pointer_to(addresses[entry, {scalar_column(spec, k)}], scalar_like)[0])"
        for k in range(len(spec.scalars))
    )
    scalars = f"({scalars},)" if scalars else "()"  # Lion and SGD keep no count
    lines = [
        "if cuda.threadIdx.x == 0:",
        "    inverse_scale = 1.0",
        "    if scale_at != 0:",
        "        inverse_scale = 1.0 / float64(pointer_to(scale_at, float32(0))[0])",
        "    lr_now = float64(lr)",
        "    if lr_at != 0:",
        "        lr_now = float64(pointer_to(lr_at, lr)[0])",
        f"    computed = LIVE({scalars}, lr_now, inverse_scale, settings)",
    ]
    lines += [
        f"    live_coefficients[{k}] = computed[0][{k}]"
        for k in range(len(spec.coefficients._fields))
    ]
    lines += [f"    live_entry[{k}] = computed[1][{k}]" for k in range(spec.live_entry_width)]
    lines += [f"    live_scalars[{k}] = computed[2][{k}]" for k in range(len(spec.scalars))]
    lines.append("cuda.syncthreads()")
    return [indent + line for line in lines]


def segment_lines(spec, indent):
    """Lines after a segment's `elements.segment_source`: every thread reads the
    coefficients `coefficient_lines` computed (rebinding ``coefficients``, ``values``
    and the entry flags, which ``live`` returns after the entry coefficients, as a
    launch table holds them)."""
    shared = ", ".join(
        f"same_type(live_coefficients[{k}], like)" for k in range(len(spec.coefficients._fields))
    )
    entry = "".join(
        f"same_type(live_entry[{k}], like), " for k in range(spec.entry_coefficient_count)
    )
    lines = [f"coefficients = ({shared},)", f"values = ({entry})"]
    if spec.live_entry_flags:  # else the table's, bound by `elements.segment_source`
        for offset, flag in enumerate(spec.entry_flags, start=spec.entry_coefficient_count):
            lines.append(f"{flag} = live_entry[{offset}] != 0")
    return [indent + line for line in lines]


def skip_lines(indent):
    """Lines between a segment's bounds (``first``, ``end``) and its element loop, which
    follows them indented one level more: with ``found_inf`` set, no element steps
    (gradients cleared all the same)."""
    lines = [
        "if skipped:  # GradScaler found inf or NaN: nothing steps",
        "    if clear:",
        "        for i in range(first, end, cuda.blockDim.x):",
        "            grad[i] = 0",
        "else:  # the element loop, one level in",
    ]
    return [indent + line for line in lines]


def epilogue(spec, indent):
    """Lines after a segment's element loop (and its sums' `kernels.sums.epilogue`): the
    block that finishes an entry's last segment writes the entry's new scalar state
    and resets its count. With sums of squares, their epilogue has counted the segment
    and found that block (``last_block``), and reset the count."""
    if spec.squares:  # every thread is past its elements: the sums' epilogue waited
        lines = ["if cuda.threadIdx.x == 0 and last_block[0] == 1 and not skipped:"]
    else:
        lines = [
            "cuda.syncthreads()  # every thread has read this segment's coefficients",
            "if cuda.threadIdx.x == 0:",
            "    cuda.threadfence()",
            "    if cuda.atomic.add(done, entry, 1) == segments[segment, 3] - 1:",
            "        done[entry] = 0",
            "        if not skipped:",
        ]
    inner = "    " if spec.squares else "            "
    for k in range(len(spec.scalars)):
        column = scalar_column(spec, k)
        lines.append(
            f"{inner}pointer_to(addresses[entry, {column}], scalar_like)[0] = "
            f"same_type(live_scalars[{k}], scalar_like)"
        )
    if not spec.scalars:
        lines.append(f"{inner}pass")
    return [indent + line for line in lines]
