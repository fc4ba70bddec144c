"""Validation loss (sd-scripts' deterministic validation): held-out batches, evaluated every N
steps at fixed timesteps with fixed noise, without gradients.

The timesteps are kohya's: 4 evenly inside the schedule (200, 400, 600, 800 of 1000; sigmas
0.2 .. 0.8 for a flow family). The noise of batch i at timestep k comes from its own
counter-based generator (validation seed, i, k), and torch's global generators are restored
afterwards, so the training steps draw exactly what they draw without validation: the same
weights give the same validation loss at any step, and resumed runs stay exact."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from trainers import seeds
from trainers.conditioning import unet_inputs
from trainers.step import diffusion_loss

TIMESTEPS = 4  # kohya's NUM_VALIDATION_TIMESTEPS


class ValidationError(ValueError):
    pass


@dataclass
class Validation:
    batches: list  # trainers.loop.Batch, fixed: one held-out image each
    every: int  # validate every N optimizer steps
    seed: int


def fixed_times(objective) -> list[float]:
    """kohya's validation timesteps: linspace over the schedule without its two ends."""
    total = getattr(objective, "scheduler", None)
    if total is not None:  # noise prediction: integer timesteps
        return [int(t) for t in np.linspace(0, objective.total, TIMESTEPS + 2, dtype=int)[1:-1]]
    return [k / (TIMESTEPS + 1) for k in range(1, TIMESTEPS + 1)]  # flow matching: sigmas


def check_split(split: float, field: str = "validation_split") -> list[str]:
    if not 0.0 <= split < 1.0:
        return [f"{field}: the held-out share must be at least 0 and below 1, got {split}"]
    return []


def held_out_count(images: int, split: float) -> int:
    """How many of `images` are held out: the share rounded, at least one when asked."""
    if split <= 0:
        return 0
    return max(1, round(images * split))


def split_indices(names: list[str], split: float, seed: int,
                  where: str = "validation_split") -> tuple[list[int], list[int]]:
    """(training, held-out) indices of images named `names`: a seeded shuffle of the names
    sorted, the last share held out (kohya's split_train_val, without its overlap: no image is
    in both). Holding out every image is refused by name."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    seeds.rng(seed, "validation split").shuffle(order)
    count = held_out_count(len(order), split)
    if count and count >= len(order):
        raise ValidationError(f"{where}: holding out {split:g} of {len(order)} image(s) leaves "
                              "none to train on; lower it or use validation_data_dir")
    cut = len(order) - count
    return sorted(order[:cut]), sorted(order[cut:])


def validation_loss(model, unet, objective, validation: Validation, encode, *, predict=None,
                    device=None, dtype=None, autocast=contextlib.nullcontext(),
                    min_snr_gamma: float = 0.0, noise_offset: float = 0.0) -> float:
    """The mean loss over every held-out batch at every fixed timestep (no gradients; torch's
    global generators and the network's train mode are restored)."""
    times = fixed_times(objective)
    devices = [device] if device is not None and device.type == "cuda" else []
    was_training = unet.training
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        unet.eval()
        try:
            for index, batch in enumerate(validation.batches):
                with autocast:
                    context, added = unet_inputs(encode(batch.texts), batch.latents, batch.sizes,
                                                 getattr(model, "vae_scale", 8))
                    for k, t in enumerate(times):
                        fixed = torch.full((batch.latents.shape[0],), t,
                                           dtype=torch.long if isinstance(t, int) else torch.float32)
                        loss = diffusion_loss(unet, objective, batch.latents, context,
                                              seeds.generator(validation.seed, "validation", index, k),
                                              weight=batch.weights, min_snr_gamma=min_snr_gamma,
                                              noise_offset=noise_offset, added_cond=added,
                                              device=device, dtype=dtype, predict=predict,
                                              times=fixed)
                        total += float(loss)
                        count += 1
        finally:
            unet.train(was_training)
    return total / max(1, count)
