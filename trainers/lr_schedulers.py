"""Learning-rate schedules by name (kohya's --lr_scheduler), as pure functions of the step.

`rate_factor(name, step, ...)` is the multiplier diffusers' `get_scheduler` applies at 0-based
optimizer step `step`: it uses diffusers' own schedule function, taken once from a throw-away
LambdaLR, so the curves are diffusers' exactly, and nothing depends on how many times a
scheduler was stepped, so a resumed run gets the same rates as an uninterrupted one.

Curves (w = warmup steps, T = total steps, p = (step - w) / (T - w)):
- constant: 1 (kohya refuses warmup steps with it).
- constant_with_warmup: step / w during warmup, then 1.
- linear: warmup, then (T - step) / (T - w), not below 0.
- cosine: warmup, then half a cosine from 1 to 0 (diffusers' get_scheduler ignores num_cycles).
- cosine_with_restarts: warmup, then num_cycles hard-restarted half cosines; 0 from T on.
- polynomial: warmup, then (base_lr - 1e-7) * (1 - p)^power + 1e-7, divided by base_lr;
  this curve depends on the base learning rate, so `base_lr` is required for it."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial")


class ScheduleError(ValueError):
    pass


def warmup_steps_for(value: int | float, total_steps: int) -> int:
    """kohya's lr_warmup_steps: an int is a number of steps, a float below 1 a share of all."""
    if isinstance(value, float) and 0 <= value < 1:
        return int(value * total_steps)
    if value < 0:
        raise ScheduleError(f"lr_warmup_steps: must not be negative, got {value}")
    return int(value)


def check_schedule(name: str, total_steps: int, warmup_steps: int, num_cycles: int = 1,
                   power: float = 1.0, base_lr: float | None = None) -> None:
    if name not in SCHEDULERS:
        raise ScheduleError(f"lr_scheduler: unknown schedule {name!r}; known: "
                            f"{', '.join(SCHEDULERS)}")
    if total_steps < 1:
        raise ScheduleError(f"max_train_steps: must be at least 1, got {total_steps}")
    if warmup_steps < 0:
        raise ScheduleError(f"lr_warmup_steps: must not be negative, got {warmup_steps}")
    if name == "constant" and warmup_steps:
        raise ScheduleError("lr_warmup_steps: the constant schedule has no warmup; set it to 0 "
                            "or choose constant_with_warmup")
    if name == "cosine_with_restarts" and num_cycles < 1:
        raise ScheduleError(f"lr_scheduler_num_cycles: must be at least 1, got {num_cycles}")
    if name == "polynomial":
        if base_lr is None:
            raise ScheduleError("learning_rate: the polynomial schedule needs the base "
                                "learning rate (it decays towards 1e-7)")
        if not base_lr > 1e-7:
            raise ScheduleError(f"learning_rate: the polynomial schedule decays to 1e-7, so "
                                f"the learning rate must be larger, got {base_lr}")
        if power <= 0:
            raise ScheduleError(f"lr_scheduler_power: must be positive, got {power}")


@lru_cache(maxsize=64)
def _curve(name: str, total_steps: int, warmup_steps: int, num_cycles: int, power: float,
           base_lr: float) -> Callable[[int], float]:
    from diffusers.optimization import get_scheduler
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = get_scheduler(name, dummy, num_warmup_steps=warmup_steps,
                              num_training_steps=total_steps, num_cycles=num_cycles, power=power)
    return scheduler.lr_lambdas[0]


def rate_factor(name: str, step: int, total_steps: int, warmup_steps: int = 0,
                num_cycles: int = 1, power: float = 1.0, base_lr: float | None = None) -> float:
    """The learning-rate multiplier at 0-based optimizer step `step`."""
    check_schedule(name, total_steps, warmup_steps, num_cycles, power, base_lr)
    lr = float(base_lr) if name == "polynomial" else 1.0
    return float(_curve(name, int(total_steps), int(warmup_steps), int(num_cycles),
                        float(power), lr)(int(step)))


def schedule_rates(name: str, base_lrs: Sequence[float], total_steps: int, warmup_steps: int = 0,
                   num_cycles: int = 1, power: float = 1.0, reference_lr: float | None = None
                   ) -> Callable[[int], list[float] | None]:
    """`rates(step)` for the training loop: each param group's rate at `step`, None from
    `total_steps` on. All groups share one multiplier; the polynomial one is computed from
    `reference_lr` (the optimizer's default lr, as LambdaLR does; default: the first group's)."""
    base_lrs = [float(v) for v in base_lrs]
    if not base_lrs:
        raise ScheduleError("learning_rate: no parameter groups")
    reference = float(reference_lr) if reference_lr is not None else base_lrs[0]
    check_schedule(name, total_steps, warmup_steps, num_cycles, power, reference)

    def rates(step: int) -> list[float] | None:
        if step >= total_steps:
            return None
        factor = rate_factor(name, step, total_steps, warmup_steps, num_cycles, power,
                             reference)
        return [lr * factor for lr in base_lrs]

    return rates
