"""The NaN/inf check of a training step, read with the step's loss in one host sync.

A gradient gauge is a 0-dim tensor that is finite exactly when every gradient is: their total
2-norm (one read-only reduction per tensor, no boolean copies; when the step clips by norm, the
norm clipping computes anyway, so no pass of its own). The 2-norm also counts gradients whose
squares overflow fp32 (|g| around 1e19) as bad, which no run survives either. On a CPU the
2-norm is ~8x cheaper than the largest |g| and ~12x cheaper than isfinite().all() per tensor
(bench/grad_check_cost.py)."""
from __future__ import annotations

import math

import torch


def gauge(parameters, clip_mode: str, clip_value: float) -> tuple[torch.Tensor | None, bool]:
    """(the gauge or None when nothing has a gradient, whether the gradients were clipped).

    Clipping by norm happens here, with the norm it returns as the gauge; a NaN/inf norm makes
    clipping write NaN into the gradients, which is harmless: such a step's gradients are
    dropped. Clipping by value must wait for the verdict, since it would turn inf into finite."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None, False
    if clip_mode == "norm":
        return torch.nn.utils.clip_grad_norm_(parameters, clip_value), True
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0), False


def read(loss: torch.Tensor, gauge_value: torch.Tensor | None) -> tuple[float, float | None]:
    """The step's loss and gauge as Python floats, in a single device -> host copy."""
    if gauge_value is None:
        return loss.item(), None
    both = torch.stack([loss.detach().float(), gauge_value.detach().float().to(loss.device)])
    total, grads = both.tolist()
    return total, grads


def verdict(total_loss: float, gauge_value: float | None) -> str | None:
    """What went NaN/inf in this step, or None."""
    if not math.isfinite(total_loss):
        return f"loss became {total_loss}"
    if gauge_value is not None and not math.isfinite(gauge_value):
        return "gradients became NaN/inf"
    return None
