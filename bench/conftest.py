"""pytest-benchmark set-up: explicit thread counts, reported with the machine info."""

import os

import numba
import torch

THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count()))
torch.set_num_threads(THREADS)
numba.set_num_threads(THREADS)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["threads"] = {"torch": torch.get_num_threads(), "numba": numba.get_num_threads()}
    machine_info["versions"] = {"torch": torch.__version__, "numba": numba.__version__}
