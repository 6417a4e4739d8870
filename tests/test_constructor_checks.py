"""The constructor raises what torch.optim's raises, in its order, with its messages.

torch checks the hyperparameter values (Tensor ones included) before it reads
``params``, then the parameters, then ``fused`` against the other switches. Every
combination of up to two bad arguments below, with good, missing (``None``), empty and
single-Tensor ``params``, must give the same exception type and message as torch's
class, or succeed where it succeeds.
"""

import inspect
import itertools
import warnings

import pytest
import torch

import fastmomentum
from fastmomentum.capabilities import CAPABILITIES

T = torch.tensor

#: Bad arguments (each a dict of constructor options); those an optimizer does not take
#: are left out for it.
BAD = {
    "lr-two-elements": {"lr": T([0.1, 0.2])},
    "lr-negative": {"lr": -1.0},
    "lr-negative-tensor": {"lr": T(-1.0)},
    "lr-tensor-foreach": {"lr": T(0.1), "foreach": True},
    "eps": {"eps": -1.0},
    "weight-decay": {"weight_decay": -1.0},
    "momentum": {"momentum": -1.0},
    "betas-mixed": {"betas": (0.9, T(0.99))},
    "betas-ints": {"betas": (0, 0.9)},
    "betas-tensor-foreach": {"betas": (T(0.9), T(0.99)), "foreach": True},
    "beta0": {"betas": (1.5, 0.9)},
    "beta1": {"betas": (0.9, -0.1)},
    "betas-two-elements": {"betas": (T([0.9, 0.8]), T(0.9))},
    "betas-one-element-1d": {"betas": (T([0.9]), T([0.99]))},
    "nesterov": {"nesterov": True},
    "nesterov-dampening": {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
    "fused-foreach": {"fused": True, "foreach": True},
    "alpha": {"alpha": -1.0},
    "lr-decay": {"lr_decay": -1.0},
    "initial-accumulator": {"initial_accumulator_value": -1.0},
    "momentum-decay": {"momentum_decay": -1.0},
}

PARAMS = {
    "params": lambda: [torch.nn.Parameter(torch.randn(2))],
    "none": lambda: None,
    "empty": lambda: [],
    "a-tensor": lambda: torch.nn.Parameter(torch.randn(2)),
}

#: Every optimizer with a torch.optim namesake (the registry's).
NAMES = [name for name, row in CAPABILITIES.items() if row.torch_peer == name]


def outcome(cls, make_params, options):
    """``("ok",)``, or the exception's type name and message."""
    params = make_params()
    listed = params if isinstance(params, list) else []
    before = [p.detach().clone() for p in listed]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(params, **options)
    except Exception as error:  # noqa: BLE001 - the error is what is compared
        for param, value in zip(listed, before):
            assert torch.equal(param, value), "a constructor that raises changed a parameter"
        return type(error).__name__, str(error)
    return ("ok",)


def combinations(name):
    accepted = set(inspect.signature(getattr(torch.optim, name).__init__).parameters)
    bad = [key for key, options in BAD.items() if set(options) <= accepted]
    return [()] + [(key,) for key in bad] + list(itertools.combinations(bad, 2))


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("name", NAMES)
def test_constructor_errors_are_torchs_in_torchs_order(name, params):
    ours, theirs = getattr(fastmomentum, name), getattr(torch.optim, name)
    different = []
    for combination in combinations(name):
        options = {k: v for key in combination for k, v in BAD[key].items()}
        mine = outcome(ours, PARAMS[params], options)
        reference = outcome(theirs, PARAMS[params], options)
        if mine != reference:
            different.append((combination, mine, reference))
    assert not different, f"{len(different)} differ, e.g. {different[:3]}"


def test_tensor_betas_are_kept_as_torch_keeps_them():
    """torch turns 1-element tensors of any shape into 0-dim ones (``_to_scalar``)."""
    betas = (T([0.9]), T([0.99]))
    for library in (fastmomentum, torch.optim):
        group = library.Adam([torch.nn.Parameter(torch.randn(2))], betas=betas).param_groups[0]
        assert [b.shape for b in group["betas"]] == [torch.Size([]), torch.Size([])]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"differentiable": True}, "differentiable=True"),
        ({"capturable": True}, "capturable=True"),
        ({"state_dtype": torch.float16}, "state_dtype must be"),
        ({"master_weights": True}, "master_weights=True is for bfloat16"),
    ],
)
def test_our_own_refusals_come_after_torchs_checks(options, message):
    """Options torch takes and we do not (or torch lacks) are refused after torch's own
    errors: with ``params=None`` the error is still torch's."""
    with pytest.raises(TypeError, match="not iterable"):
        fastmomentum.Adam(None, **options)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fastmomentum.Adam([torch.nn.Parameter(torch.randn(2))], lr=-1.0, **options)
    with pytest.raises(ValueError, match=message):
        fastmomentum.Adam([torch.nn.Parameter(torch.randn(2))], **options)
