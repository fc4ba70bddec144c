"""The NaN/inf gradient check: one reduction per gradient, read with the loss in one host sync,
and still exact when a single element of one gradient among many is not finite."""
from __future__ import annotations

import math

import pytest
import torch

from trainers import grad_check


def many_parameters(count=120):
    generator = torch.Generator().manual_seed(0)
    params = []
    for index in range(count):
        shape = (7, 5) if index % 3 else (11,)
        param = torch.nn.Parameter(torch.zeros(shape))
        param.grad = torch.randn(shape, generator=generator)
        params.append(param)
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: ignored
    return params


@pytest.mark.parametrize("mode", ["disabled", "value", "norm"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_one_bad_element_in_one_gradient_of_many_is_caught(mode, bad):
    params = many_parameters()
    params[77].grad[3, 2] = bad
    gauge, _ = grad_check.gauge(params, mode, 0.5)
    loss, value = grad_check.read(torch.tensor(0.25), gauge)
    assert loss == 0.25
    assert grad_check.verdict(loss, value) == "gradients became NaN/inf"


@pytest.mark.parametrize("mode", ["disabled", "value", "norm"])
def test_finite_gradients_pass_and_only_norm_mode_clips_here(mode):
    params = many_parameters()
    before = [p.grad.clone() for p in params if p.grad is not None]
    gauge, clipped = grad_check.gauge(params, mode, 0.5)
    loss, value = grad_check.read(torch.tensor(1.5), gauge)
    assert grad_check.verdict(loss, value) is None and math.isfinite(value)
    after = [p.grad for p in params if p.grad is not None]
    assert clipped == (mode == "norm")
    def norm(grads):
        return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    assert value == pytest.approx(norm(before), rel=1e-5)  # the total norm of all gradients
    if mode == "norm":  # the one clipping measured, and the gradients were clipped
        assert norm(after) == pytest.approx(0.5, rel=1e-4)
    else:  # value clipping is left to the loop, after the verdict
        assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_gradient_whose_squares_overflow_fp32_counts_as_bad():
    params = many_parameters()
    params[40].grad[0] = 3e19
    gauge, _ = grad_check.gauge(params, "disabled", 0.0)
    assert grad_check.verdict(*grad_check.read(torch.tensor(0.1), gauge)) == \
        "gradients became NaN/inf"


def test_loss_is_checked_first_and_no_gradients_means_no_gauge():
    params = many_parameters()
    params[5].grad[0] = math.nan
    gauge, _ = grad_check.gauge(params, "disabled", 0.0)
    loss, value = grad_check.read(torch.tensor(math.inf), gauge)
    assert grad_check.verdict(loss, value) == "loss became inf"
    bare = [torch.nn.Parameter(torch.zeros(2))]
    assert grad_check.gauge(bare, "norm", 1.0) == (None, False)
    assert grad_check.read(torch.tensor(2.0), None) == (2.0, None)
    assert grad_check.verdict(2.0, None) is None


def test_the_loss_and_the_gauge_leave_the_device_in_one_copy(monkeypatch):
    params = many_parameters()
    gauge, _ = grad_check.gauge(params, "disabled", 0.0)
    copies = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            copies.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    grad_check.read(torch.tensor(0.5), gauge)
    assert copies == ["tolist"]
