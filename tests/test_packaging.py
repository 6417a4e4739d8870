"""The kernel library must import and run where torch is not installed."""

import subprocess
import sys
import textwrap


def assert_prints_ok(script):
    """Run ``script`` in a fresh interpreter; it must exit cleanly after printing "ok"."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


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
