"""The exact-resume tests' failure report (tests/exact_resume.py) names the step, the values and
the first tensor where an interrupted and resumed run parts from the uninterrupted one."""
from __future__ import annotations

import math

import torch

from tests.exact_resume import (StepRecorder, environment, first_different_loss,
                                first_divergent_step, weight_differences)

X = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))


def train(steps: range, weights: torch.Tensor, state: dict | None = None,
          scale_loss_at: int | None = None):
    """SGD with momentum on a linear layer for these 0-based steps, recorded; returns
    (recorder, losses, weights, optimizer state)."""
    layer = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weights)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    if state is not None:
        optimizer.load_state_dict(state)
    losses = []
    with StepRecorder() as recorder:
        for step in steps:
            loss = layer(X).pow(2).mean()
            if step == scale_loss_at:
                loss = loss * (1 + 2 ** -20)  # the same state, a slightly different computation
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return recorder, losses, layer.weight.detach().clone(), optimizer.state_dict()


START = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))


def test_a_faithful_resume_reports_nothing():
    whole, losses, final, _ = train(range(4), START)
    first, head, weights, state = train(range(2), START)
    second, tail, resumed, _ = train(range(2, 4), weights, state)
    assert first_different_loss(losses, head + tail, 2) is None
    assert weight_differences({"w": final}, {"w": resumed}) is None
    assert first_divergent_step(whole, [first, second], 2) == (
        "every step started from the same state and computed the same gradients")


def test_a_resume_that_restores_other_weights_is_named_at_its_first_step():
    whole, losses, final, _ = train(range(4), START)
    first, head, weights, state = train(range(2), START)
    # one unit in the last place
    weights[1, 2] = torch.nextafter(weights[1, 2], torch.tensor(math.inf))
    second, tail, resumed, _ = train(range(2, 4), weights, state)
    text = first_divergent_step(whole, [first, second], 2)
    assert text.startswith("step 3 started from a different state (what the resume restored): "
                           "parameter 0.0 [2, 3] first (1 of 2 differ)")
    loss = first_different_loss(losses, head + tail, 2)
    assert loss.startswith("loss of step 3 (the 1st after resuming at step 2): ")
    assert f"{losses[2]!r} uninterrupted vs {tail[0]!r} resumed" in loss
    report = weight_differences({"w": final}, {"w": resumed})
    assert report.startswith("final weights: 1 of 1 tensors differ, first w (largest difference")


def test_the_same_state_computing_other_gradients_is_told_apart_from_a_bad_restore():
    whole, losses, _, _ = train(range(4), START)
    first, head, weights, state = train(range(2), START)
    second, tail, _, _ = train(range(2, 4), weights, state, scale_loss_at=3)
    text = first_divergent_step(whole, [first, second], 2)
    assert text.startswith("step 4 started from the same trained tensors and optimizer state but "
                           "computed different gradients, gradient of parameter 0.0 [2, 3] first")
    assert first_different_loss(losses, head + tail, 2).startswith(
        "loss of step 4 (the 2nd after resuming at step 2)")
    assert "torch threads per run (uninterrupted, interrupted, resumed): " in environment(
        [whole, first, second])


def test_missing_steps_tensors_and_shapes_are_reported_not_compared():
    whole, losses, final, _ = train(range(4), START)
    first, head, weights, state = train(range(2), START)
    assert first_divergent_step(whole, [first], 2) == (
        "optimizer steps: 4 uninterrupted vs 2 interrupted + resumed")
    assert first_different_loss(losses, head, 2) == (
        "4 losses uninterrupted vs 2 interrupted + resumed")
    assert weight_differences({"w": final}, {"v": final}) == (
        "the final files hold different tensors: ['v', 'w']")
    assert weight_differences([final], [final.half()]) == ("final weights: 1 of 1 tensors differ, "
                                                           "first 0 (torch.float32[2, 3] vs "
                                                           "torch.float16[2, 3])")
