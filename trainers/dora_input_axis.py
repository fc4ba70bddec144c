"""DoRA with its norm on the input axis (LyCORIS `wd_on_output = False`, the only axis A1111's
Lora extension reads), in place of peft's output-axis DoRA module inside a peft LoRA layer.

peft calls `layer.lora_magnitude_vector[adapter](x, lora_A=, lora_B=, scaling=, base_layer=, ...)`
and adds what it returns to the base output. With c = m / ||W + s * B A|| per input column (the
norm detached, as the DoRA paper and peft do), the decomposed weight is (W + s B A) diag(c), so

    W' x - W x = W ((c - 1) * x) + s * B(A(c * x))

(a convolution scales its input channels, which is the same for groups = 1). The magnitude m is
kept in the file's shape, `dora_scale` [1, in] / [1, in, 1, 1], initialised to W's column norms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.formats.dora import column_norm


class InputAxisDora(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        weight = base_layer.weight.detach().float()
        if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
            raise ValueError("input-axis DoRA needs convolutions without groups")
        self.weight = nn.Parameter(column_norm(weight, output_axis=False))

    def _apply_base(self, base_layer: nn.Module, x: torch.Tensor, weight: torch.Tensor):
        if isinstance(base_layer, nn.Conv2d):
            return F.conv2d(x, weight, None, base_layer.stride, base_layer.padding,
                            base_layer.dilation)
        return F.linear(x, weight)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None,
                adapter_name=None):
        weight = base_layer.weight.to(x.dtype)
        rank = lora_A.weight.shape[0]
        lora_weight = (lora_B.weight.reshape(-1, rank) @ lora_A.weight.reshape(rank, -1))
        merged = weight + scaling * lora_weight.reshape(weight.shape).detach().to(x.dtype)
        norm = column_norm(merged.float(), output_axis=False).detach()
        scale = (self.weight / norm).to(x.dtype)
        if not isinstance(base_layer, nn.Conv2d):
            scale = scale.reshape(-1)
        scaled = x * scale
        return self._apply_base(base_layer, scaled - x, weight) + \
            lora_B(lora_A(scaled)) * scaling
