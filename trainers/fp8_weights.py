"""Frozen base weights stored in 8 bits (kohya's `fp8_base`): every Linear and Conv2d weight of
the denoiser is kept as float8_e4m3fn with one fp32 scale per tensor (its largest magnitude
maps to e4m3's 448), and up-cast to the input's dtype each time the layer runs. Half the bytes
of bf16 for the weights that dominate the model; what trains (LoRA factors) stays fp32 beside
them, and peft wraps these layers like any Linear / Conv2d."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.detach().abs().max().float().clamp(min=1e-12) / FP8_MAX
    return (weight.detach().float() / scale).to(FP8), scale


class Fp8Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "fp8_scale" not in self._buffers:  # a plain layer of this class (peft copies the type)
            return super().forward(x)
        weight = self.weight.to(x.dtype) * self.fp8_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class Fp8Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "fp8_scale" not in self._buffers:
            return super().forward(x)
        weight = self.weight.to(x.dtype) * self.fp8_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, weight, bias)


_CLASSES = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def store_fp8(model: nn.Module) -> int:
    """Quantize every plain Linear / Conv2d weight of `model` in place; returns how many.
    The module objects stay (their class becomes the fp8 one), so references to them hold."""
    count = 0
    for module in model.modules():
        kind = _CLASSES.get(type(module))
        if kind is None:
            continue
        quantized, scale = _quantize(module.weight)
        # a buffer, not a parameter: diffusers reports a model's dtype as its first floating
        # parameter's, which stays the compute dtype (a bias or a norm) for pipelines and the loop
        del module.weight
        module.register_buffer("weight", quantized)
        module.register_buffer("fp8_scale", scale, persistent=False)
        module.__class__ = kind
        count += 1
    return count


def dequantized(module: nn.Module) -> torch.Tensor:
    """A quantized layer's weight as it computes with it (float32)."""
    return module.weight.float() * module.fp8_scale
