"""fp16 loss scaling (torch's GradScaler) that also unscales fp16 gradients, as full_fp16's
gradients are: torch refuses them ("Attempting to unscale FP16 gradients") because an fp16
gradient unscaled in place can underflow; kohya's full_fp16 lifts the same check. The
gradients are unscaled in fp16 and checked for inf/NaN as usual; one whose true size is below
fp16's smallest value (6e-8) becomes 0, as in kohya's. fp32 gradients (LoRA factors, embeddings
under fp16 autocast) are unscaled exactly as before."""
from __future__ import annotations

import torch

INIT_SCALE = 2.0 ** 16  # torch's default; a test raises it to force overflowing steps


class LossScaler(torch.amp.GradScaler):
    def __init__(self, device: str):
        super().__init__(device, init_scale=INIT_SCALE)

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)
