"""The one diffusion training step every method shares."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Guided:
    """Conditioning for a prediction with classifier-free guidance in the loss (DreamArtist):
    negative + scale * (positive - negative) is what gets compared with the target."""
    positive: torch.Tensor
    negative: torch.Tensor
    scale: float


def diffusion_loss(unet, objective, latents: torch.Tensor, context: torch.Tensor | Guided,
                   generator: torch.Generator, weight: torch.Tensor | None = None,
                   min_snr_gamma: float = 0.0, noise_offset: float = 0.0,
                   added_cond: dict | None = None, device: torch.device | None = None,
                   dtype: torch.dtype | None = None, rows: slice | None = None,
                   batch_size: int | None = None,
                   x0_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   predict: Callable | None = None,
                   times: torch.Tensor | None = None) -> torch.Tensor:
    """Noise the latents at random times, predict, and return the (weighted) MSE against the
    objective's target, plus `x0_loss` of the clean latents the prediction implies, when given.

    `objective` is the model family's (`trainers/objectives.py`): it draws the timesteps or
    sigmas, noises the latents, names the target and weighs the loss.
    `added_cond` is the family's extra conditioning (SDXL's `text_embeds`, `time_ids`; Flux's
    pooled text and guidance), None for SD 1.x/2.x; `predict` is the family's call of its
    denoiser (`Family.predict`), the U-Net's by default. `times` fixes the timesteps (sigmas for
    a flow family) instead of drawing them (validation, trainers/validation.py).
    `device` / `dtype` are the U-Net's; the loop passes them once per run, because diffusers'
    `unet.device` / `unet.dtype` walk every sub-module on each call.
    With `rows`, the latents are those rows of a batch of `batch_size` (one process's shard in
    data-parallel training): noise and timesteps are drawn for the whole batch and sliced, so
    the processes together draw what one process training the whole batch draws."""
    device = unet.device if device is None else device
    dtype = unet.dtype if dtype is None else dtype
    latents = latents.to(device, dtype)
    rows = rows if rows is not None else slice(0, latents.shape[0])
    drawn = (batch_size or latents.shape[0],) + tuple(latents.shape[1:])
    noise = torch.randn(drawn, generator=generator)[rows].to(latents)
    if noise_offset:
        offset = torch.randn(drawn[:2] + (1, 1), generator=generator)[rows].to(latents)
        noise = noise + noise_offset * offset
    if times is None:
        times = objective.sample_times(drawn[0], generator, latents)[rows]
    times = times.to(device)
    noisy = objective.noisy(latents, noise, times)

    added_cond = objective.conditioning(added_cond, latents.shape[0])
    if added_cond is not None:
        added_cond = {k: v.to(device, dtype) for k, v in added_cond.items()}
    prediction = (predict or unet_prediction)(unet, noisy, objective.model_timesteps(times),
                                              context, added_cond, dtype)
    target = objective.target(latents, noise, times)

    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if weight is not None:
        loss = loss * weight.to(loss.device)
    loss = loss.mean(dim=tuple(range(1, loss.dim())))
    per_image = objective.loss_weight(times, min_snr_gamma)
    if per_image is not None:
        loss = loss * per_image
    loss = loss.mean()
    if x0_loss is not None:
        loss = loss + x0_loss(objective.predicted_latents(noisy, prediction, times))
    return loss


def unet_prediction(unet, noisy: torch.Tensor, timesteps: torch.Tensor, context,
                    added_cond: dict | None, dtype: torch.dtype) -> torch.Tensor:
    """The U-Net's output (SD 1.x / 2.x / SDXL), with guidance in the loss for `Guided`."""
    added_cond = {k: v for k, v in (added_cond or {}).items() if k != "guidance"}
    extra = {"added_cond_kwargs": added_cond} if added_cond else {}
    if not isinstance(context, Guided):
        return unet(noisy, timesteps, context.to(dtype), **extra).sample
    if "added_cond_kwargs" in extra:  # the same extra conditioning for both halves
        extra = {"added_cond_kwargs": {k: torch.cat([v, v])
                                       for k, v in extra["added_cond_kwargs"].items()}}
    both = unet(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                torch.cat([context.negative, context.positive]).to(dtype), **extra).sample
    negative, positive = both.chunk(2)
    return negative + context.scale * (positive - negative)
