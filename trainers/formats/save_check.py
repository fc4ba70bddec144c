"""Refuse to write weights that would not come back as they are: nan/inf values, or values that
overflow the precision they are saved in (fp32 weights of 1e6 become inf in fp16)."""
from __future__ import annotations

from typing import Mapping

import torch

PRECISION_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                   torch.float64: "fp64"}


class SaveRefusedError(ValueError):
    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: not saved, {reason}; the previous file is kept")
        self.user_message = str(self)
        self.reason = reason  # without the file's name


def check_savable(what: str, tensors: Mapping[str, torch.Tensor],
                  dtype: torch.dtype | None = None) -> None:
    """SaveRefusedError unless every floating value of `tensors` is finite and fits `dtype`
    (each tensor's own dtype when None). One min/max pass per tensor when all is well."""
    largest, worst, overflowing, non_finite, where = 0.0, None, 0, 0, ""
    for key, value in tensors.items():
        if not torch.is_tensor(value) or not value.is_floating_point() or value.numel() == 0:
            continue
        target = dtype or value.dtype
        limit = torch.finfo(target).max
        low, high = (float(v) for v in torch.aminmax(value.detach()))
        if max(-low, high) <= limit:  # false for nan too
            continue
        value = value.detach().float()
        finite = torch.isfinite(value)
        bad = int((~finite).sum())
        magnitude = value.abs().masked_fill(~finite, 0)
        over = int((magnitude > limit).sum())
        non_finite += bad
        overflowing += over
        if over and float(magnitude.max()) > largest:
            largest, worst = float(magnitude.max()), target
        where = where or key
    if non_finite:
        raise SaveRefusedError(what, f"{non_finite} values are nan/inf (first in {where})")
    if overflowing:
        name = PRECISION_NAMES.get(worst, str(worst))
        raise SaveRefusedError(what, f"{overflowing} values overflow {name} (largest "
                                     f"{largest:.3g}; {name} holds up to "
                                     f"{torch.finfo(worst).max:.6g})")
