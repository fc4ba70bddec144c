"""Optimizer registry (kohya's names and arguments) and stateless learning-rate schedules that
match diffusers' schedulers."""
from __future__ import annotations

import sys

import pytest
import torch

from core.config import ConfigError
from trainers import optimizers
from trainers.lr_schedulers import (SCHEDULERS, ScheduleError, rate_factor, schedule_rates,
                                    warmup_steps_for)
from trainers.optimizers import (OPTIMIZERS, OptimizerError, advice, available_optimizers,
                                 create_optimizer, parse_optimizer_args)

RATES = {"AdamW": 0.1, "AdamW8bit": 0.1, "PagedAdamW8bit": 0.1, "PagedAdamW": 0.1,
         "PagedAdamW32bit": 0.1, "Lion": 0.03, "Lion8bit": 0.03, "PagedLion8bit": 0.03,
         "Prodigy": 1.0, "Adafactor": 0.1, "SGDNesterov": 0.05, "SGDNesterov8bit": 0.05}
BITSANDBYTES = ["AdamW8bit", "PagedAdamW8bit", "PagedAdamW", "PagedAdamW32bit", "Lion8bit",
                "PagedLion8bit", "SGDNesterov8bit"]


def _quadratic_run(name: str, steps: int = 15) -> tuple[float, float]:
    weight = torch.nn.Parameter(torch.tensor([3.0, -2.0, 1.5, 0.5]))
    target = torch.tensor([0.5, 0.5, -0.5, 1.0])
    optimizer = create_optimizer(name, [weight], RATES[name])
    losses = []
    for _ in range(steps):
        loss = ((weight - target) ** 2).sum()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses[0], ((weight - target) ** 2).sum().item()


def test_registry_has_kohyas_names():
    from trainers.configs import OPTIMIZERS as FORM_CHOICES
    from trainers.memory_estimate import OPTIMIZER_BYTES
    assert set(OPTIMIZERS) == set(RATES)
    assert set(available_optimizers()) == set(RATES)
    assert sorted(FORM_CHOICES) == sorted(OPTIMIZERS) and set(OPTIMIZER_BYTES) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", BITSANDBYTES)
def test_bitsandbytes_optimizers_keep_their_state_small_and_learn(name):
    """The 8-bit ones keep 8-bit state for tensors of 4096+ elements (bitsandbytes' rule); the
    32-bit paged ones keep float32 state; all of them train."""
    reason = available_optimizers()[name]
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = create_optimizer(name, [weight], RATES[name])
    first = None
    for _ in range(20):
        loss = (weight ** 2).sum()
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (weight ** 2).sum().item() < 0.9 * first
    state = optimizer.state[weight]["state1"]
    assert state.dtype == (torch.uint8 if name.endswith("8bit") else torch.float32), state.dtype
    if name == "SGDNesterov8bit":  # kohya's momentum default (bitsandbytes keeps it in betas)
        assert optimizer.param_groups[0]["betas"][0] == 0.9


@pytest.mark.parametrize("name", sorted(RATES))
def test_each_available_optimizer_reduces_a_quadratic(name):
    reason = available_optimizers()[name]
    if reason is not None:
        with pytest.raises(OptimizerError, match=name):
            create_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], 0.1)
        pytest.skip(f"{name}: {reason}")
    first, last = _quadratic_run(name)
    assert last < 0.9 * first, (name, first, last)


def test_the_pure_python_packages_are_installed():
    # lion-pytorch and prodigyopt are in requirements.txt
    available = available_optimizers()
    assert available["Lion"] is None and available["Prodigy"] is None


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    optimizers._problem.cache_clear()
    try:
        reason = available_optimizers()["AdamW8bit"]
        assert reason and "bitsandbytes" in reason and "not installed" in reason
        with pytest.raises(OptimizerError) as caught:
            create_optimizer("AdamW8bit", [torch.nn.Parameter(torch.zeros(2))], 1e-3)
        message = str(caught.value)
        assert "AdamW8bit" in message and "bitsandbytes" in message
        assert "pip install bitsandbytes" in message
        assert isinstance(caught.value, ConfigError)
    finally:
        monkeypatch.undo()
        optimizers._problem.cache_clear()


def test_names_are_case_insensitive_and_groups_keep_their_rates():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    optimizer = create_optimizer("adamw", [{"params": [a], "lr": 1e-3}, {"params": [b]}], 1e-4,
                                 weight_decay=0.1)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]
    assert optimizer.param_groups[0]["weight_decay"] == 0.1


def test_sgd_nesterov_uses_momentum_09():
    optimizer = create_optimizer("SGDNesterov", [torch.nn.Parameter(torch.zeros(2))], 0.01)
    group = optimizer.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.9
    custom = create_optimizer("SGDNesterov", [torch.nn.Parameter(torch.zeros(2))], 0.01,
                              momentum=0.5)
    assert custom.param_groups[0]["momentum"] == 0.5


def test_adafactor_follows_the_schedule_unless_relative_step():
    from transformers.optimization import Adafactor
    optimizer = create_optimizer("Adafactor", [torch.nn.Parameter(torch.zeros(2))], 0.01)
    assert isinstance(optimizer, Adafactor)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01 and group["relative_step"] is False
    assert group["scale_parameter"] is False and group["warmup_init"] is False
    weight = torch.nn.Parameter(torch.ones(3))
    relative = create_optimizer("Adafactor", [{"params": [weight], "lr": 0.5}], 0.01,
                                warmup_init=True)
    group = relative.param_groups[0]
    assert group["relative_step"] is True and group["lr"] is None
    weight.grad = torch.ones(3)
    relative.step()  # Adafactor computes its own rate
    assert not torch.equal(weight.detach(), torch.ones(3))


def test_errors_name_the_problem():
    with pytest.raises(OptimizerError, match="unknown optimizer 'Adam9'.*AdamW"):
        create_optimizer("Adam9", [torch.nn.Parameter(torch.zeros(2))], 0.1)
    with pytest.raises(OptimizerError, match="optimizer_args.*AdamW"):
        create_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(2))], 0.1, betaz=(0.9, 0.9))
    with pytest.raises(OptimizerError, match="no trainable parameters"):
        create_optimizer("AdamW", [], 0.1)
    with pytest.raises(OptimizerError, match="learning_rate"):
        create_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(2))], float("nan"))


def test_optimizer_args_are_parsed_like_kohya():
    assert parse_optimizer_args(["weight_decay=0.1", "betas=(0.9,0.99)",
                                 "relative_step=False", "d_coef='2'"]) == {
        "weight_decay": 0.1, "betas": (0.9, 0.99), "relative_step": False, "d_coef": "2"}
    assert parse_optimizer_args("a=1 b=True") == {"a": 1, "b": True}
    with pytest.raises(OptimizerError, match="optimizer_args"):
        parse_optimizer_args(["weight_decay"])
    with pytest.raises(OptimizerError, match="weight_decay"):
        parse_optimizer_args(["weight_decay=abc"])


def test_prodigy_advice():
    assert advice("Prodigy", 1e-4) and not advice("Prodigy", 1.0) and not advice("AdamW", 1e-4)


# ----------------------------------------------------------------------------- schedules

CASES = [
    ("constant", dict(warmup=0)),
    ("constant_with_warmup", dict(warmup=10)),
    ("linear", dict(warmup=10)),
    ("linear", dict(warmup=0)),
    ("cosine", dict(warmup=10)),
    ("cosine_with_restarts", dict(warmup=5, num_cycles=3)),
    ("cosine_with_restarts", dict(warmup=0, num_cycles=1)),
    ("polynomial", dict(warmup=10, power=2.0)),
    ("polynomial", dict(warmup=0, power=1.0)),
]


@pytest.mark.parametrize("name,options", CASES)
def test_rate_factor_matches_diffusers_scheduler(name, options):
    from diffusers.optimization import get_scheduler
    total, base = 60, 1e-3
    warmup, cycles, power = options["warmup"], options.get("num_cycles", 1), options.get("power", 1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                              num_cycles=cycles, power=power)
    for step in range(total + 3):
        expected = optimizer.param_groups[0]["lr"]
        ours = base * rate_factor(name, step, total, warmup, cycles, power, base_lr=base)
        assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15), (name, step)
        optimizer.step()
        scheduler.step()


def test_every_schedule_name_is_tested():
    assert {name for name, _ in CASES} == set(SCHEDULERS)


def test_schedule_rates_are_stateless_per_group_and_end():
    rates = schedule_rates("cosine", [1e-4, 1e-3], total_steps=100, warmup_steps=10)
    later = rates(57)
    assert rates(0) == [0.0, 0.0] and rates(10) == pytest.approx([1e-4, 1e-3])
    assert rates(57) == later  # asking again, or after other steps, gives the same
    assert later[1] == pytest.approx(10 * later[0])
    assert rates(100) is None


def test_schedule_errors():
    with pytest.raises(ScheduleError, match="unknown schedule"):
        rate_factor("cosinus", 0, 10)
    with pytest.raises(ScheduleError, match="lr_warmup_steps"):
        rate_factor("constant", 0, 10, warmup_steps=5)
    with pytest.raises(ScheduleError, match="learning_rate"):
        rate_factor("polynomial", 0, 10)
    assert warmup_steps_for(0.1, 200) == 20 and warmup_steps_for(15, 200) == 15


def test_adamw_uses_the_fused_kernel_with_the_same_updates_unless_told_otherwise():
    torch.manual_seed(0)
    start = torch.randn(6, 5)
    fused_w, plain_w = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    fused = create_optimizer("AdamW", [{"params": [fused_w], "lr": 0.05}], 0.1, weight_decay=0.01)
    plain = torch.optim.AdamW([plain_w], lr=0.05, weight_decay=0.01)
    assert fused.param_groups[0]["fused"] is True
    for _ in range(5):
        grad = torch.randn(6, 5)
        for weight, optimizer in ((fused_w, fused), (plain_w, plain)):
            weight.grad = grad.clone()
            optimizer.step()
    assert torch.allclose(fused_w, plain_w, atol=1e-6)
    assert not torch.equal(fused_w, start)
    told = create_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(2))], 0.1,
                            **parse_optimizer_args("fused=False"))
    assert not told.param_groups[0]["fused"]
