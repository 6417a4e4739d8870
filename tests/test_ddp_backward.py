"""``step_in_backward=True`` under DDP (gloo, 2 processes): `fastmomentum.ddp`'s hook steps
each DDP bucket after its all-reduce, bit for bit as the ordinary DDP loop."""

import pytest
import torch

from . import ddp_backward_run, distributed_run

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp-backward")
    distributed_run.launch(ddp_backward_run.worker, folder, what="DDP step_in_backward run")
    return [torch.load(folder / f"ddp-backward-{rank}.pt") for rank in range(2)]


def assert_equal_states(ours, reference):
    """Two ``state_dict()``s: the same entries, every tensor bit for bit."""
    assert ours["state"].keys() == reference["state"].keys()
    for index, entry in reference["state"].items():
        assert ours["state"][index].keys() == entry.keys(), index
        for key, value in entry.items():
            assert torch.equal(ours["state"][index][key], value), (index, key)
    for group, other in zip(ours["param_groups"], reference["param_groups"]):
        assert group["lr"] == other["lr"]


@pytest.mark.parametrize("case", list(ddp_backward_run.SCENARIOS))
def test_steps_after_all_reduce_equal_the_ordinary_ddp_loop(ranks, case):
    for rank, results in enumerate(ranks):
        ours, reference = results[case]["ours"], results[case]["reference"]
        for index, (p, q) in enumerate(zip(ours["params"], reference["params"])):
            assert torch.equal(p, q), f"{case}, rank {rank}: parameter {index}"
        assert_equal_states(ours["state"], reference["state"])
        # every stepping backward left no gradient behind; hooks and scheduler as torch's
        assert all(ours["freed"]), ours["freed"]
        assert ours["hooks"] == reference["hooks"] == {"pre": 5, "post": 5}
        assert ours["warnings"] == reference["warnings"] == []
    for p, q in zip(ranks[0][case]["ours"]["params"], ranks[1][case]["ours"]["params"]):
        assert torch.equal(p, q), f"{case}: the ranks' parameters differ"


def test_steps_ran_on_the_process_groups_threads(ranks):
    """gloo completes the all-reduce, and runs its ``.then`` steps, on its own threads:
    Numba's threading layer took those calls (the run above did not abort)."""
    assert any(results["adamw"]["ours"]["off_main_thread"] for results in ranks)


def test_without_the_hook_the_first_backward_raises_and_changes_nothing(ranks):
    for results in ranks:
        refused = results["refused"]
        assert "step_after_all_reduce(ddp_model, optimizer)" in refused["message"]
        assert refused["unchanged"]
        assert refused["state"] == 0


def test_a_step_after_a_no_sync_backward_is_refused(ranks):
    for results in ranks:
        refused = results["step-after-no-sync"]
        assert "never all-reduced" in refused["message"]
        assert refused["unchanged"]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("not-ddp", "DistributedDataParallel"),
        ("not-in-backward", "step_in_backward=True"),
        ("missing", "misses 1"),
        ("extra", "holds 1"),
    ],
)
def test_step_after_all_reduce_refuses_before_registering(ranks, case, words):
    checks = ranks[0]["checks"]
    assert words in checks[case]
    assert not checks[case + "-by_ddp"]
