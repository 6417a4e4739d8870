"""Generated source kept as files: the element steps, CPU loops and CUDA kernels that
`elements`, `cpu` and `cuda` write from a rule's `specs.KernelSpec`.

Each piece of generated source is compiled under a file of its own, named after a digest
of everything its compiled code is made of (`digest`), so that:

- tracebacks, ``pdb`` and ``inspect.getsource`` show the generated lines (not unrelated
  lines of the module that generated them);
- Numba's on-disk cache, which it keys on the function's source file and that file's
  time stamp only, never serves a kernel compiled from older rules: an edit to a rule,
  the element step, a 16-bit conversion or an 8-bit code changes the digest, hence the
  file name, hence the cache entry (no digest to keep by hand).

The files go to the first writable folder of ``$NUMBA_CACHE_DIR/fastmomentum``, the
package's ``__pycache__/generated`` and ``~/.cache/fastmomentum`` (as Numba looks for
its own cache). Where none is writable the source is registered with `linecache` under
a name of the same form in angle brackets, tracebacks still show it, and Numba compiles
without its cache (`diskcache` warns once).
"""

import functools
import hashlib
import inspect
import linecache
import os
import tempfile
from pathlib import Path

from . import diskcache

_HERE = Path(__file__).resolve().parent

#: What every generated function is made of, as globs under `kernels/`: the rules, the
#: specs and generators, and what the generated code inlines.
SOURCES = (
    "rules/*.py",
    "specs.py",
    "elements.py",
    "cpu.py",
    "contraction.py",
    "cuda.py",
    "cuda_blockwise.py",
    "generated.py",
    "pointers.py",
    "precision.py",
    "quantization.py",
    "tables.py",
    "vectors.py",
)


@functools.cache
def digest():
    """A digest of the files of `SOURCES` (16 hex digits), computed once per process."""
    return digest_of(_HERE)


def digest_of(folder):
    """The digest of `SOURCES` under ``folder`` (a copy of `kernels/`)."""
    summed = hashlib.sha256()
    for pattern in SOURCES:
        for path in sorted(Path(folder).glob(pattern)):
            summed.update(path.relative_to(folder).as_posix().encode())
            summed.update(path.read_bytes())
    return summed.hexdigest()[:16]


def _rule_files(spec):
    """Source files of ``spec``'s rules that lie outside `SOURCES` (a rule written
    elsewhere, by a user or a test), whose edits must change the file name too."""
    files = set()
    for rule in (spec.rule, spec.fused_rule, spec.blockwise_rule):
        function = getattr(rule, "py_func", rule)  # a register_jitable keeps its Python
        path = inspect.getsourcefile(function) if function is not None else None
        if path and not Path(path).resolve().is_relative_to(_HERE):
            files.add(Path(path))
    return sorted(files)


def file_name(kind, spec, source):
    """The name generated ``source`` of ``kind`` (``"element"``, ``"cpu"``, ``"cuda"``)
    for ``spec`` is compiled under: ``<kind>_<spec name>_<digest>.py``, the digest that
    of `digest`, the source itself and any rule file outside the package."""
    summed = hashlib.sha256(f"{digest()}\n{source}".encode())
    for path in _rule_files(spec):
        summed.update(path.read_bytes())
    return f"{kind}_{spec.name}_{summed.hexdigest()[:16]}.py"


def compile_into(namespace, kind, spec, source):
    """Execute ``source`` in ``namespace`` as the file `file_name` names; return whether
    Numba can cache what is compiled from it (`diskcache.available`)."""
    name = file_name(kind, spec, source)
    path = _written(name, source)
    if path is None:
        filename = f"<fastmomentum generated {name}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        cacheable = False
        diskcache.warn_once()
    else:
        filename = str(path)
        cacheable = diskcache.available(filename)
    exec(compile(source, filename, "exec"), namespace)
    return cacheable


def _written(name, source):
    """The path of a file holding ``source`` in the first writable `_folders`, written
    unless there already (a file's name says its content: rewriting it would only
    change its time stamp, which Numba's cache checks); None where none is writable."""
    for folder in _folders():
        path = folder / name
        if path.is_file():
            return path
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
                f.write(source)
            os.replace(f.name, path)  # whole, even with another process writing it too
        except OSError:
            continue
        return path
    return None


def _folders():
    """Where generated files may go, in order of preference."""
    folders = []
    if os.environ.get("NUMBA_CACHE_DIR"):
        folders.append(Path(os.environ["NUMBA_CACHE_DIR"]) / "fastmomentum")
    folders.append(_HERE / "__pycache__" / "generated")
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folders.append(Path(home) / "fastmomentum")
    return folders
