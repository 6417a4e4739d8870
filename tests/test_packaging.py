"""The kernel library must import and run where torch is not installed, and where
nothing on disk is writable."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

#: No child interpreter may hang a test run; a cold compile of a few kernels on a
#: loaded machine takes tens of seconds.
TIMEOUT_S = 300


def run_python(script, **options):
    """Run ``script`` in a fresh interpreter (``options`` for `subprocess.run`); it must
    exit cleanly. Returns its standard output."""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT_S,
        **options,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_prints_ok(script):
    """Run ``script`` in a fresh interpreter; it must exit cleanly after printing "ok"."""
    assert run_python(script).strip() == "ok"


def test_kernels_import_and_run_without_torch():
    script = textwrap.dedent(
        """
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        import fastmomentum
        import fastmomentum.kernels as kernels

        param, grad = np.ones(5, np.float32), np.full(5, 0.5, np.float32)
        kernels.sgd_step(param, grad, lr=0.1)
        assert np.allclose(param, 0.95), param
        assert "torch" not in sys.modules
        try:
            fastmomentum.SGD
        except ImportError as error:
            assert "torch is blocked" in str(error)
        else:
            raise AssertionError("fastmomentum.SGD imported although torch is blocked")
        print("ok")
        """
    )
    assert_prints_ok(script)


def test_cuda_arrays_without_numba_cuda_get_an_error_naming_it():
    script = textwrap.dedent(
        """
        import sys

        class BlockNumbaCuda:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "numba_cuda" or name.startswith("numba.cuda"):
                    raise ImportError("numba-cuda is blocked in this test")

        sys.meta_path.insert(0, BlockNumbaCuda())
        import numpy as np
        from fastmomentum.kernels import sgd_step
        from fastmomentum.devices import cuda_unavailable_reason

        class FakeGpuArray:
            __cuda_array_interface__ = {"shape": (3,), "typestr": "<f4", "data": (1, False),
                                        "version": 3}

        param = np.ones(3, np.float32)
        sgd_step(param, np.ones(3, np.float32), lr=0.5)  # the CPU path is unaffected
        assert param.tolist() == [0.5, 0.5, 0.5]
        try:
            sgd_step(FakeGpuArray(), FakeGpuArray(), lr=0.1)
        except ImportError as error:
            assert "pip install 'fastmomentum[cuda]'" in str(error), error
        else:
            raise AssertionError("no error for CUDA arrays without numba-cuda")
        assert "numba-cuda" in cuda_unavailable_reason()
        print("ok")
        """
    )
    assert_prints_ok(script)


def test_without_torch_the_optimizers_name_what_to_install():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import fastmomentum
        try:
            fastmomentum.SGD
        except ModuleNotFoundError as error:
            assert "needs PyTorch" in str(error) and "fastmomentum[torch]" in str(error), error
            assert error.name == "torch"
        else:
            raise AssertionError("fastmomentum.SGD without torch")
        print("ok")
        """
    )
    assert_prints_ok(script)


def test_public_names_are_visible_to_dir_and_type_checkers():
    import ast
    import importlib.metadata
    import pathlib

    import fastmomentum

    assert {"SGD", "Adam", "AdamW", "kernels"} <= set(dir(fastmomentum))
    # type checkers read the TYPE_CHECKING imports, not the lazy __getattr__
    tree = ast.parse(pathlib.Path(fastmomentum.__file__).read_text())
    checked = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    ]
    imported = {alias.name for node in checked for i in node.body for alias in i.names}
    assert imported == set(fastmomentum.__all__)
    # and they find the package: an editable install is a plain path, not an import hook
    files = importlib.metadata.distribution("fastmomentum").files or []
    for pth in [f for f in files if f.name.endswith(".pth")]:
        lines = pth.read_text().split()
        assert lines and not lines[0].startswith("import"), lines


STEPS_SCRIPT = textwrap.dedent(
    """
    import json, warnings

    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastmomentum.kernels
        import torch

        results = {}
        for name, make in [
            ("sgd", lambda p: fastmomentum.SGD(p, lr=0.1, momentum=0.9)),
            ("adam_int8", lambda p: fastmomentum.Adam(p, lr=0.01, state_dtype="int8_blockwise")),
        ]:
            torch.manual_seed(0)
            param = torch.nn.Parameter(torch.randn(1000))
            optimizer = make([param])
            for _ in range(3):
                param.grad = torch.randn(1000)
                optimizer.step()
            results[name] = param.detach().tolist()
        # whole-array 8-bit conversion (`quantization._quantize`, `_dequantize`)
        state = fastmomentum.dequantized_state_dict(optimizer.state_dict())["state"]
        results["dequantized"] = state[0]["exp_avg"].tolist()
    print(json.dumps({
        "file": fastmomentum.kernels.__file__,
        "warnings": [str(w.message) for w in caught],
        "results": results,
    }))
    """
)


def _read_only_copy(destination):
    """The installed package copied (its ``kernels`` link followed) into
    ``destination``, read-only, with nowhere for Numba to cache: root, as CI runs, ignores
    permission bits, so a *file* named ``__pycache__`` stands in every package folder."""
    import fastmomentum

    package = destination / "fastmomentum"
    shutil.copytree(
        Path(fastmomentum.__file__).parent, package, symlinks=False,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )  # fmt: skip
    folders = [package, *(path for path in package.rglob("*") if path.is_dir())]
    for folder in folders:
        (folder / "__pycache__").touch()
    for path in [*package.rglob("*"), package]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return package


def test_a_read_only_install_without_a_writable_home_compiles_without_numbas_cache(tmp_path):
    """A container run as a non-root user, a read-only image: the package and HOME are
    read-only and NUMBA_CACHE_DIR is unset, so Numba has no cache directory
    (``RuntimeError: ... no locator available`` at import, before). The kernels compile
    without the cache, the numbers are those of a normal install, and one warning
    names NUMBA_CACHE_DIR."""
    package = _read_only_copy(tmp_path / "site")
    home = tmp_path / "home"  # a file: even root cannot create ~/.cache/numba under it
    home.touch()
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH")
    }
    environment.update(HOME=str(home), PYTHONPATH=str(package.parent))
    try:
        read_only = json.loads(run_python(STEPS_SCRIPT, env=environment, cwd=tmp_path))
    finally:
        for path in [package, *package.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    normal = json.loads(run_python(STEPS_SCRIPT, cwd=tmp_path))

    assert Path(read_only["file"]).is_relative_to(package)  # the copy, not the checkout
    assert not list(package.parent.rglob("*.nbi")), "Numba cached somewhere in the copy"
    about_the_cache = [text for text in read_only["warnings"] if "NUMBA_CACHE_DIR" in text]
    assert len(about_the_cache) == 1, read_only["warnings"]
    assert not [text for text in normal["warnings"] if "NUMBA_CACHE_DIR" in text]
    assert read_only["results"] == normal["results"]
