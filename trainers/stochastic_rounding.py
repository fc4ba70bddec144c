"""full_bf16 / full_fp16 (kohya's; OneTrainer's "stochastic rounding"): the trained weights are
stored in bf16 or fp16, and each optimizer step is taken in fp32 on one parameter at a time,
then rounded back stochastically: up or down with the odds of the remainder, so that an update
smaller than half a step of the stored format (bf16 has 8 bits of mantissa, fp16 11: 1e-4
against a weight of 1 is under half a step of either) still moves the weight on average
instead of being rounded away every time. Chosen over Kahan-compensated updates because it
needs no second copy of the weights (the compensation buffer would cost as much as the
half-precision weights save back), and bf16 already used it.

The rounding noise is counter-based (the run's seed, the parameter's step count and its
number), so an interrupted run repeats exactly; the optimizer state stays fp32 (torch would
cast it to the dtype of the parameters when a saved state is loaded, so loading goes through
fp32 stand-ins)."""
from __future__ import annotations

import torch

from trainers.seeds import derive_seed


def round_into_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> None:
    """Write fp32 `source` into bf16 or fp16 `target`, each value rounded up or down at random
    in proportion to how near it is."""
    if target.dtype == torch.float16:
        _round_into_fp16_(target, source, generator)
        return
    # bf16 is fp32 cut short: random low 16 bits are added to the fp32 bit pattern and then cut
    # off (what is left is exactly a bf16 value)
    noise = torch.randint(0, 1 << 16, source.shape, dtype=torch.int32, generator=generator,
                          device=source.device)
    bits = noise.add_(source.contiguous().view(torch.int32))
    target.copy_(bits.bitwise_and_(-65536).view(torch.float32))


def _round_into_fp16_(target: torch.Tensor, source: torch.Tensor,
                      generator: torch.Generator) -> None:
    """fp16 has its own exponent range (subnormals below 6.1e-5, largest 65504), so no bit
    trick: the fp16 neighbours below and above each value are found with nextafter, and the
    upper one is taken with the odds of the distance from the lower one."""
    source = source.float()
    near = source.to(torch.float16)
    above = near.float() > source
    step_down = torch.nextafter(near, torch.full_like(near, -float("inf")))
    step_up = torch.nextafter(near, torch.full_like(near, float("inf")))
    low = torch.where(above, step_down, near)
    high = torch.where(above, near, step_up)
    gap = high.float() - low.float()
    odds = torch.where(gap > 0, (source - low.float()) / gap, torch.zeros_like(source))
    draw = torch.rand(source.shape, generator=generator, device=source.device)
    target.copy_(torch.where(draw < odds, high, low))


class StochasticRounding:
    """Installed on an optimizer of bf16 or fp16 parameters: its step (and load_state_dict) go through
    here. `step_one` is also what a fused backward pass calls per parameter."""

    def __init__(self, optimizer: torch.optim.Optimizer, seed: int):
        self.optimizer, self.seed = optimizer, seed
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.number = {id(p): i for i, p in enumerate(self.params)}
        self._class_step = type(optimizer).step
        self._load = optimizer.load_state_dict
        optimizer.step = self.step
        optimizer.load_state_dict = self.load_state_dict

    def step(self, closure=None):
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.step_one(param, group)

    def step_one(self, param: torch.Tensor, group: dict) -> None:
        optimizer, low = self.optimizer, param.data
        param.data = low.float()
        param.grad = param.grad.float()
        groups = optimizer.param_groups
        optimizer.param_groups = [{**group, "params": [param]}]
        try:
            self._class_step(optimizer)
        finally:
            optimizer.param_groups = groups
        updated = param.data
        param.data = low
        param.grad = None
        count = optimizer.state[param].get("step", 0)
        count = int(count.item() if torch.is_tensor(count) else count)
        generator = torch.Generator(low.device).manual_seed(
            derive_seed(self.seed, "rounding", count, self.number[id(param)]))
        round_into_(low, updated, generator)

    def load_state_dict(self, state: dict) -> None:
        kept = [p.data for p in self.params]
        for param in self.params:  # torch casts the state to its parameter's dtype
            param.data = torch.empty(0, dtype=torch.float32, device=param.device)
        try:
            self._load(state)
        finally:
            for param, data in zip(self.params, kept):
                param.data = data
