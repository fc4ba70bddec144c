"""Training objectives: how a model family noises latents and what its network is trained to
predict. The one diffusion step (`trainers/step.py`) asks an objective for timesteps, the noisy
input, the target and the loss weights, so a family is one objective choice, not a branch there.

- `NoisePrediction`: SD 1.x / 2.x / SDXL. DDPM noising on `alphas_cumprod`; the target is the
  noise (epsilon) or v; optional min-SNR weighting.
- `FlowMatching`: rectified-flow transformers (Flux, SD3, Z-Image, Chroma, Qwen-Image).
  noisy = (1 - sigma) * latents + sigma * noise, target = noise - latents, sigmas drawn as
  sd-scripts and diffusers offer, optional `sigma_sqrt` / `cosmap` loss weighting.
"""
from __future__ import annotations

import math

import torch

from trainers.flow_options import FlowMatchingOptions, NoiseWeighting, ObjectiveError

SNR_CAP = 1000.0  # kohya caps the SNR at 1000 in its v-like-noise and debiased weights


class NoisePrediction:
    """DDPM noising; predict epsilon or v (`prediction_type` of the scheduler config)."""

    def __init__(self, scheduler_config: dict, weighting: NoiseWeighting = NoiseWeighting()):
        from diffusers import DDPMScheduler
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.weighting = weighting
        self.kind = self.scheduler.config.prediction_type
        if self.kind not in ("epsilon", "v_prediction"):
            raise ObjectiveError(f"unsupported prediction type {self.kind!r}")
        self.total = self.scheduler.config.num_train_timesteps

    def sample_times(self, count: int, generator: torch.Generator, latents: torch.Tensor):
        """Integer timesteps in [0, num_train_timesteps), one per image."""
        return torch.randint(0, self.total, (count,), generator=generator)

    def model_timesteps(self, times: torch.Tensor) -> torch.Tensor:
        return times

    def conditioning(self, added: dict | None, count: int) -> dict | None:
        return added

    def noisy(self, latents, noise, times):
        return self.scheduler.add_noise(latents, noise, times)

    def target(self, latents, noise, times):
        if self.kind == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, times)

    def loss_weight(self, times: torch.Tensor, min_snr_gamma: float = 0.0):
        """Per-image weight of the loss, or None: min-SNR (Hang et al.), v-prediction's loss
        scaled like noise prediction's, debiased estimation — each as kohya computes it. With a
        zero-terminal-SNR schedule the last timestep's SNR is 0: its weights stay finite."""
        w = self.weighting
        if not (min_snr_gamma or w.v_like_noise or w.debiased):
            return None
        alphas = self.scheduler.alphas_cumprod.to(times.device)[times]
        snr = (alphas / (1 - alphas)).clamp(min=1e-8)
        weight = torch.ones_like(snr)
        if min_snr_gamma:
            clipped = torch.clamp(snr, max=min_snr_gamma)
            weight = weight * (clipped / (snr + 1) if self.kind == "v_prediction" else clipped / snr)
        capped = snr.clamp(max=SNR_CAP)
        if w.v_like_noise:
            weight = weight * capped / (capped + 1)
        if w.debiased:
            weight = weight / capped.sqrt()
        return weight

    def predicted_latents(self, noisy, prediction, times):
        """The clean latents a prediction implies at these timesteps (x0 from epsilon or v)."""
        alphas = self.scheduler.alphas_cumprod.to(noisy.device)[times].view(-1, 1, 1, 1)
        alphas = alphas.to(prediction.dtype)
        if self.kind == "v_prediction":
            return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
        return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()


class FlowMatching:
    """Rectified flow: the network predicts the velocity noise - latents at sigma in (0, 1).
    The model is fed sigma * 1000 as its timestep, as diffusers' flow-matching pipelines do."""

    def __init__(self, options: FlowMatchingOptions = FlowMatchingOptions(),
                 num_train_timesteps: int = 1000, patch_tokens: int = 4):
        options.validate()
        self.options = options
        self.total = num_train_timesteps
        self.patch_tokens = patch_tokens  # latent pixels per token, for Flux's shift (2x2 packing)

    def sample_times(self, count: int, generator: torch.Generator, latents: torch.Tensor):
        """Sigmas in (0, 1), one per image."""
        o = self.options
        if o.sampling == "uniform":
            return torch.rand((count,), generator=generator)
        if o.sampling == "mode":
            u = torch.rand((count,), generator=generator)
            return 1 - u - o.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        sigmas = torch.sigmoid(o.logit_mean + o.logit_std * torch.randn((count,), generator=generator))
        if o.sampling == "shift":
            return _shifted(sigmas, math.log(o.shift))
        if o.sampling == "flux_shift":
            return _shifted(sigmas, self._resolution_mu(latents))
        return sigmas

    def _resolution_mu(self, latents: torch.Tensor) -> float:
        """Flux's shift grows linearly with the image's token count (256 -> base, 4096 -> max)."""
        tokens = latents.shape[-1] * latents.shape[-2] / self.patch_tokens
        slope = (self.options.max_shift - self.options.base_shift) / (4096 - 256)
        return self.options.base_shift + slope * (tokens - 256)

    def model_timesteps(self, times: torch.Tensor) -> torch.Tensor:
        return times * self.total

    def conditioning(self, added: dict | None, count: int) -> dict:
        """The extra conditioning plus the guidance value (a guidance-distilled model's input;
        the family's predict drops it for a model without a guidance embedding)."""
        return {**(added or {}), "guidance": torch.full((count,), float(self.options.guidance))}

    def noisy(self, latents, noise, times):
        sigma = _per_image(times, latents)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents, noise, times):
        return noise - latents

    def loss_weight(self, times: torch.Tensor, min_snr_gamma: float = 0.0):
        if min_snr_gamma:
            raise ObjectiveError("min-SNR weighting: does not apply to flow-matching models "
                                 "(use the loss weighting instead)")
        if self.options.weighting == "sigma_sqrt":
            return times.float().clamp(min=1e-4) ** -2.0
        if self.options.weighting == "cosmap":
            return 2.0 / (math.pi * (1 - 2 * times.float() + 2 * times.float() ** 2))
        return None

    def predicted_latents(self, noisy, prediction, times):
        return noisy - _per_image(times, noisy).to(prediction.dtype) * prediction


def _shifted(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Move sigmas toward 1 by exp(mu), the time shift of SD3 / Flux."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def _per_image(times: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return times.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))
