"""Whether Numba can keep compiled kernels on disk, so that nothing fails where it cannot.

``cache=True`` makes Numba look for a writable directory for a function's source file,
in this order (``numba.core.caching.CacheImpl``, and numba-cuda's copy of it):
``NUMBA_CACHE_DIR`` when set, the ``__pycache__`` beside the file, then the user-wide
``$XDG_CACHE_HOME/numba`` (``~/.cache/numba``). Where none is writable (a read-only
install and no writable home: a container run as a non-root user, a read-only image) it
raises ``RuntimeError: cannot cache function ...: no locator available``, which made
``import fastmomentum.kernels`` fail. There the kernels now compile without the cache,
again in every process, and the process is told once how to keep them.
"""

import functools
import warnings

from numba.core.caching import FunctionCache

WARNING = (
    "fastmomentum: Numba has no writable directory to cache compiled kernels in (tried "
    "NUMBA_CACHE_DIR, the package's __pycache__ and ~/.cache/numba), so every process "
    "compiles them again at each optimizer configuration's first step (seconds each). "
    "Set NUMBA_CACHE_DIR to a writable directory to keep them."
)


@functools.cache
def available(module_file):
    """Whether Numba can cache the functions compiled from ``module_file`` (``cache=``
    for its ``njit`` / ``cuda.jit``); warns once per process when it cannot.

    Numba's locators depend on the file only, so one probe function compiled under that
    file name answers for all of them. The probe builds what ``njit(cache=True)`` builds
    (numba-cuda's ``CUDACache`` tries the same locators in the same order), which
    creates the cache directory as Numba would have.
    """
    namespace = {}
    exec(compile("def probe():\n    pass\n", module_file, "exec"), namespace)
    try:
        FunctionCache(namespace["probe"])
    except RuntimeError:  # no locator available
        warn_once()
        return False
    return True


@functools.cache
def warn_once():
    """Say once per process that compiled kernels cannot be kept (`WARNING`)."""
    warnings.warn(WARNING, RuntimeWarning, stacklevel=3)
