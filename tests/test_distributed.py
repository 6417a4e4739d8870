"""DDP (gloo, 2 processes on loopback) and ZeroRedundancyOptimizer with our optimizers."""

import pytest
import torch

import fastmomentum

from . import distributed_run
from .assertions import RTOL, assert_relative_close

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    distributed_run.launch(distributed_run.worker, folder, what="DDP and ZeRO run")
    return torch.load(folder / "distributed.pt")


@pytest.mark.parametrize(("case", "name", "bucket_view", "set_to_none"), distributed_run.CASES)
def test_ddp_matches_one_process_on_the_whole_batch(results, case, name, bucket_view, set_to_none):
    model = distributed_run.make_model(name)
    optimizer = getattr(fastmomentum, name)(model.parameters(), **distributed_run.DDP_OPTIONS[name])
    distributed_run.train(model, optimizer, 0, 1, set_to_none)
    for ddp_param, param in zip(results[case], model.parameters()):
        assert_relative_close(ddp_param, param.detach(), RTOL["float64"], case)


@pytest.mark.parametrize("bucket_view", [False, True], ids=["", "bucket-view"])
@pytest.mark.parametrize("name", list(distributed_run.OPTIONS))
def test_zero_redundancy_optimizer_accepts_our_classes(results, name, bucket_view):
    suffix = "-bucket-view" if bucket_view else ""
    ours = results[f"zero-{name}-fastmomentum{suffix}"]
    theirs = results[f"zero-{name}-torch.optim{suffix}"]
    for p, q in zip(ours, theirs):
        assert_relative_close(p, q, RTOL["float64"], f"ZeRO {name}")
    if bucket_view:  # stepped in ZeRO's buckets, where ZeRO broadcasts from
        assert results[f"zero-{name}-fastmomentum{suffix}-in-buckets"]
