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


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, context: torch.Tensor | Guided,
                   generator: torch.Generator, weight: torch.Tensor | None = None,
                   min_snr_gamma: float = 0.0, noise_offset: float = 0.0,
                   added_cond: dict | None = None, device: torch.device | None = None,
                   dtype: torch.dtype | None = None, rows: slice | None = None,
                   batch_size: int | None = None,
                   x0_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Noise the latents at random timesteps, predict, and return the (weighted) MSE, plus
    `x0_loss` of the clean latents the prediction implies, when given.

    `added_cond` is SDXL's extra conditioning (`text_embeds`, `time_ids`), None for SD 1.x/2.x.
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
    total = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, total, drawn[:1], generator=generator)[rows].to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    extra = {}
    if added_cond is not None:
        extra["added_cond_kwargs"] = {k: v.to(device, dtype) for k, v in added_cond.items()}
    prediction = _predict(unet, noisy, timesteps, context, extra, dtype)

    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {kind!r}")

    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if weight is not None:
        loss = loss * weight.to(loss.device)
    loss = loss.mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * _min_snr_weight(noise_scheduler, timesteps, min_snr_gamma, kind)
    loss = loss.mean()
    if x0_loss is not None:
        loss = loss + x0_loss(predicted_latents(noise_scheduler, noisy, prediction, timesteps))
    return loss


def _predict(unet, noisy: torch.Tensor, timesteps: torch.Tensor, context, extra: dict,
             dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(context, Guided):
        return unet(noisy, timesteps, context.to(dtype), **extra).sample
    if "added_cond_kwargs" in extra:  # the same extra conditioning for both halves
        extra = {"added_cond_kwargs": {k: torch.cat([v, v])
                                       for k, v in extra["added_cond_kwargs"].items()}}
    both = unet(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                torch.cat([context.negative, context.positive]).to(dtype), **extra).sample
    negative, positive = both.chunk(2)
    return negative + context.scale * (positive - negative)


def predicted_latents(noise_scheduler, noisy: torch.Tensor, prediction: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """The clean latents a prediction implies at these timesteps (x0 from epsilon or v)."""
    alphas = noise_scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    alphas = alphas.to(prediction.dtype)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
    return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()


def _min_snr_weight(noise_scheduler, timesteps, gamma: float, kind: str) -> torch.Tensor:
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if kind == "v_prediction" else clipped / snr
