"""Test-wide set-up.

No GPU here: unless told otherwise (``NUMBA_ENABLE_CUDASIM=0`` on a GPU machine), the
CUDA kernels run in Numba's CUDA simulator. It must be chosen before Numba is imported.

The simulator runs each CUDA block's threads as Python threads, which its launching
thread polls in a busy loop; with Python's default GIL switch interval (5 ms) that loop
holds the GIL most of the time and the simulated threads wait for it. A 0.5 ms interval
runs the simulator tests 2-3 times faster (a capturable step over TinyNet and an 8-bit
kernel over several blocks: 16 s at 5 ms, 6 s at 0.1-0.5 ms, on 2 AMD EPYC cores).

Numba's on-disk cache is keyed by the source file of the *kernel* only, so an edit to
``kernels/rules.py`` alone would leave stale compiled kernels in ``__pycache__``. The
tests therefore cache into a folder named after a hash of every kernel source file.
"""

import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if os.environ["NUMBA_ENABLE_CUDASIM"] == "1":
    sys.setswitchinterval(5e-4)  # the simulator's polling thread yields the GIL sooner

_KERNELS = Path(__file__).resolve().parent.parent / "kernels"
_digest = hashlib.sha256()
for source in sorted(_KERNELS.rglob("*.py")):
    _digest.update(source.read_bytes())
os.environ.setdefault(
    "NUMBA_CACHE_DIR", str(_KERNELS.parent / ".numba_cache" / _digest.hexdigest()[:16])
)
