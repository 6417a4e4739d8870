"""optimizer.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""

import copy

import pytest
import torch

import fastmomentum

from .assertions import RTOL, assert_relative_close
from .models import backward, make_model


@pytest.mark.parametrize("set_to_none", [True, False], ids=["autograd-grads", "flat-views"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clips", "no-op"])
def test_clip_grad_norm_matches_torch(max_norm, norm_type, set_to_none):
    model = make_model(torch.float32)
    optimizer = fastmomentum.Adam(model.parameters(), lr=1e-2, flat_gradients=not set_to_none)
    ref_model = copy.deepcopy(model)
    ref_optimizer = torch.optim.Adam(ref_model.parameters(), lr=1e-2, foreach=False)
    for step in range(5):
        for net, opt in ((model, optimizer), (ref_model, ref_optimizer)):
            opt.zero_grad(set_to_none=set_to_none)
            backward(net, step, torch.float32)
        total = optimizer.clip_grad_norm_(max_norm, norm_type)
        ref_total = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm, norm_type)
        # Exact up to summation order on the first step; later the two models differ by
        # float32 rounding of the steps (the parity tolerance), and so do their gradients.
        tolerance = 1e-6 if step == 0 else RTOL["float32"]
        assert_relative_close(total, ref_total, tolerance, "total norm")
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert_relative_close(p.grad, q.grad, tolerance, "clipped gradient")
        optimizer.step()
        ref_optimizer.step()
    if set_to_none is False:
        assert all(
            bucket.gradients.all_ours() for buckets in optimizer.buckets for bucket in buckets
        )


def test_non_finite_norm_raises_when_asked():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = fastmomentum.SGD([param], lr=0.1)
    param.grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        optimizer.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert torch.isnan(optimizer.clip_grad_norm_(1.0))
