"""DoRA (weight-decomposed LoRA) in kohya / LyCORIS files: `<name>.dora_scale` beside a
module's `lora_down.weight`, `lora_up.weight` and `alpha` (or LoHa / LoKr tensors).

The merged weight a file implies (DoRA paper, LyCORIS `apply_weight_decompose`):

    W' = m * (W + dW) / ||W + dW||

with dW the adapter's usual delta (alpha / rank * up @ down for LoRA) and m = dora_scale. The
norm's axis follows the shape of dora_scale, as ComfyUI tells them apart:

- output axis (LyCORIS `wd_on_output = True`, its default since 2025, the paper's and peft's
  choice, what Danlu writes): dora_scale [out, 1] for a Linear, [out, 1, 1, 1] for a conv; the
  norm of each output row (over in, kh, kw).
- input axis (older LyCORIS files, `wd_on_output = False`): dora_scale [1, in] / [1, in, 1, 1];
  the norm of each input column (over out, kh, kw). The only kind A1111's Lora extension reads.

At strength s a loader applies W + s * (W' - W) (A1111, ComfyUI, Forge); Danlu's previews and
Compare do the same."""
from __future__ import annotations

from typing import Mapping

import torch

SCALE = "dora_scale"


def has_dora(state: Mapping[str, torch.Tensor]) -> bool:
    return any(key.endswith("." + SCALE) for key in state)


def file_shape(weight_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """The output-axis dora_scale shape for a module whose weight has `weight_shape`."""
    return (int(weight_shape[0]),) + (1,) * (len(weight_shape) - 1)


def on_output_axis(scale: torch.Tensor, weight_shape: tuple[int, ...] | torch.Size) -> bool:
    """True for an output-axis dora_scale, False for an input-axis one; ValueError otherwise."""
    shape, dims = tuple(scale.shape), len(weight_shape)
    if shape == file_shape(weight_shape):
        return True
    if dims >= 2 and shape == (1, int(weight_shape[1])) + (1,) * (dims - 2):
        return False
    raise ValueError(f"dora_scale {list(shape)} fits neither axis of the weight "
                     f"{list(weight_shape)} (expected {list(file_shape(weight_shape))} or "
                     f"[1, {weight_shape[1]}{', 1' * (dims - 2)}])")


def column_norm(weight: torch.Tensor, output_axis: bool) -> torch.Tensor:
    """||weight|| per output row (shape [out, 1, ...]) or per input column ([1, in, ...])."""
    if output_axis:
        return weight.flatten(1).norm(dim=1).reshape(file_shape(weight.shape))
    flat = weight.transpose(0, 1).flatten(1).norm(dim=1)
    return flat.reshape((1, weight.shape[1]) + (1,) * (weight.dim() - 2))


def dora_delta(weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor,
               multiplier: float = 1.0) -> torch.Tensor:
    """multiplier * (W' - W) for base weight W, adapter delta dW (alpha / rank folded in) and
    dora_scale m, in float32: what W changes by when the file is applied at `multiplier`."""
    weight = weight.float()
    merged = weight + delta.float().reshape(weight.shape)
    norm = column_norm(merged, on_output_axis(scale, weight.shape))
    decomposed = merged * (scale.float().reshape(norm.shape) / norm)
    return (decomposed - weight) * multiplier
