"""Test-wide set-up.

No GPU here: unless told otherwise (``NUMBA_ENABLE_CUDASIM=0`` on a GPU machine), the
CUDA kernels run in Numba's CUDA simulator. It must be chosen before Numba is imported.

Numba's on-disk cache is keyed by the source file of the *kernel* only, so an edit to
``kernels/rules.py`` alone would leave stale compiled kernels in ``__pycache__``. The
tests therefore cache into a folder named after a hash of every kernel source file.
"""

import hashlib
import os
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

_KERNELS = Path(__file__).resolve().parent.parent / "kernels"
_digest = hashlib.sha256()
for source in sorted(_KERNELS.rglob("*.py")):
    _digest.update(source.read_bytes())
os.environ.setdefault(
    "NUMBA_CACHE_DIR", str(_KERNELS.parent / ".numba_cache" / _digest.hexdigest()[:16])
)
