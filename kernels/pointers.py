"""Typed pointers from raw addresses, so that a kernel steps arrays where they live.

A multi-tensor launch describes its arrays by address (`kernels.tables`): tensors that
fastmomentum does not own sit anywhere in memory, so no single NumPy or device array
covers them. ``pointer_to(address, like)`` turns an address into a pointer to ``like``'s
type; ``pointer[i]`` then reads and writes element ``i``, in CPU loops and CUDA kernels
alike. Pointer indexing has no negative-index wraparound, so LLVM vectorises the loops
over them as it does loops over arrays (measured: the same time as a flat-array loop).
"""

import ctypes

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def pointer_to(typingctx, address, like):
    """A pointer to values of ``like``'s type (a scalar) at the integer ``address``."""
    signature = types.CPointer(like)(address, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return signature, codegen


#: Elements a simulated pointer spans: far more than any array, nothing is allocated.
_SIMULATED_SPAN = 1 << 40


def simulated_pointer_to(address, like):
    """`pointer_to` for Numba's CUDA simulator, which runs kernels as Python: a NumPy
    view of host memory at ``address`` (the simulator's "device" memory is host memory)."""
    dtype = np.dtype(type(like))
    if address == 0:  # an array the launch does not use (max_exp_avg_sq without amsgrad)
        return np.empty(0, dtype)
    pointer = ctypes.cast(int(address), ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtype)))
    return np.ctypeslib.as_array(pointer, (_SIMULATED_SPAN,))


def _prefetch_codegen(locality):
    """The codegen of ``llvm.prefetch`` (a read) of ``pointer[index]`` at ``locality``."""

    def codegen(context, builder, signature, args):
        byte_pointer = ir.IntType(8).as_pointer()
        function_type = ir.FunctionType(
            ir.VoidType(), [byte_pointer, ir.IntType(32), ir.IntType(32), ir.IntType(32)]
        )
        function = cgutils.get_or_insert_function(
            builder.module, function_type, "llvm.prefetch.p0i8"
        )
        address = builder.bitcast(builder.gep(args[0], [args[1]]), byte_pointer)
        flags = [ir.Constant(ir.IntType(32), value) for value in (0, locality, 1)]
        builder.call(function, [address, *flags])
        return context.get_dummy_value()

    return codegen


@intrinsic
def prefetch(typingctx, pointer, index):
    """Ask the CPU to start loading the cache line of ``pointer[index]`` (``llvm.prefetch``:
    a read, kept in every cache level); a hint, never a fault, whatever the address."""
    return types.void(pointer, index), _prefetch_codegen(3)


@intrinsic
def prefetch_to_l2(typingctx, pointer, index):
    """`prefetch` into the second-level cache, not the first (locality 2: x86's
    ``prefetcht1``): what the 8-bit loops use, which ask for 40 lines at once per block
    (into the first level, on AMD EPYC, that made the step 15-25% slower than no
    prefetch at all; bench/NOTES.md entry 23)."""
    return types.void(pointer, index), _prefetch_codegen(2)
