"""FSDP2 (``fully_shard``, 2 processes, gloo on CPU) with our optimizers.

Each DTensor parameter is stepped through its local shard, in FSDP's own storage; the
result must equal one process training the whole model on the whole batch with
``torch.optim``, and a ``torch.distributed.checkpoint`` saved halfway must resume, in a
fresh process group, to the same parameters.
"""

import pytest
import torch
import torch.multiprocessing as mp

from . import fsdp_run
from .assertions import RTOL, assert_relative_close
from .test_distributed import free_port

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    for phase in ("train", "resume"):
        mp.spawn(fsdp_run.worker, args=(2, str(folder), free_port(), phase), nprocs=2, join=True)
    return torch.load(folder / "train.pt"), torch.load(folder / "resume.pt")


@pytest.mark.parametrize(("case", "name", "reshard"), fsdp_run.CASES)
def test_fully_sharded_training_matches_one_process(runs, case, name, reshard):
    trained, _ = runs
    model = fsdp_run.make_model()
    options = fsdp_run.OPTIONS[name]
    reference = getattr(torch.optim, name)(model.parameters(), foreach=False, **options)
    fsdp_run.train(model, reference, 0, 1, range(fsdp_run.STEPS))
    for sharded, whole in zip(trained[case], model.parameters()):
        assert_relative_close(sharded, whole.detach(), RTOL["float64"], case)
    assert trained[case + "-in-place"], "FSDP's shard storage was re-pointed"
    assert set(trained[case + "-state-kinds"]) == {"DTensor"}
    assert trained[case + "-full-load"], "a state dict of full tensors loaded other shards"


@pytest.mark.parametrize(("case", "name", "reshard"), fsdp_run.CASES)
def test_distributed_checkpoint_resumes_in_a_fresh_process_group(runs, case, name, reshard):
    trained, resumed = runs
    for continued, restarted in zip(trained[case], resumed[case]):
        assert torch.equal(continued, restarted)


def test_dtensors_we_cannot_step_are_refused_before_anything_changes(runs):
    errors = runs[0]["errors"]
    assert "parameter 0" in errors["partial"] and "Partial" in errors["partial"]
    assert "parameter 0 of param group 0" in errors["grad"] and "Replicate" in errors["grad"]
    assert errors["unchanged"]
