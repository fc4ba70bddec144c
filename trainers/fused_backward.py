"""Fused backward pass (kohya's `fused_backward_pass`) for the methods that train the whole
model: each parameter is stepped by the optimizer the moment its gradient is complete
(`Tensor.register_post_accumulate_grad_hook`), and the gradient freed, so gradients for the
whole U-Net never exist at once. Each step of AdamW and Adafactor reads only its own
parameter's gradient and state, so stepping them one at a time is the same update.

Kohya's limits hold: no gradient accumulation (each backward steps), no clipping by the total
norm (it would need every gradient first), and no fp16 loss scaling (the scaler unscales and
checks all gradients before stepping). A NaN/inf is seen only after the weights changed; the
running gradient norm kept here lets the loop's guard see it, and the loop keeps the last good
state before backward instead of before the step."""
from __future__ import annotations

import torch

OPTIMIZERS = ("AdamW", "Adafactor")


def problems(optimizer_type: str, accumulation: int, max_grad_norm: float,
             mixed_precision: str, on_nan: str) -> list[str]:
    """What kohya's fused backward cannot do with these settings, each naming its field."""
    found = []
    if optimizer_type not in OPTIMIZERS:
        found.append(f"optimizer_type: the fused backward pass steps AdamW or Adafactor one "
                     f"parameter at a time, not {optimizer_type}")
    if accumulation != 1:
        found.append("gradient_accumulation_steps: the fused backward pass steps during each "
                     "backward; set it to 1")
    if max_grad_norm:
        found.append("max_grad_norm: the fused backward pass cannot clip by the total norm "
                     "(no moment holds every gradient); set it to 0")
    if mixed_precision == "fp16":
        found.append("mixed_precision: fp16 loss scaling checks every gradient before the step; "
                     "use bf16 with the fused backward pass")
    if on_nan == "skip":
        found.append("on_nan: with the fused backward pass the weights change before a NaN/inf "
                     "shows; choose 'stop' (it keeps the last good state)")
    return found


class FusedBackward:
    """While entered, steps `optimizer`'s parameters one by one as backward completes each."""

    def __init__(self, optimizer: torch.optim.Optimizer, step_one=None):
        self.optimizer = optimizer
        self.step_one = step_one or self._step_one  # full_bf16: StochasticRounding.step_one
        self.handles = []
        self.norm_sq: torch.Tensor | None = None  # the squared gradient norm of this step

    def __enter__(self):
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                self.handles.append(param.register_post_accumulate_grad_hook(
                    lambda p, group=group: self._step(p, group)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False

    def begin(self) -> None:
        self.norm_sq = None

    def gauge(self) -> torch.Tensor | None:
        """The total gradient norm of the step (for the NaN/inf guard and the log)."""
        return None if self.norm_sq is None else self.norm_sq.sqrt()

    def _step(self, param: torch.Tensor, group: dict) -> None:
        grad = param.grad
        squared = grad.detach().float().pow(2).sum()
        self.norm_sq = squared if self.norm_sq is None else self.norm_sq + squared
        self.step_one(param, group)
        param.grad = None

    def _step_one(self, param: torch.Tensor, group: dict) -> None:
        groups = self.optimizer.param_groups
        self.optimizer.param_groups = [{**group, "params": [param]}]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
