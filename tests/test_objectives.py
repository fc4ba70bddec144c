"""Training objectives: DDPM noise prediction (epsilon / v) and flow matching."""
import math

import pytest
import torch

from trainers.objectives import FlowMatching, FlowMatchingOptions, NoisePrediction, ObjectiveError
from trainers.step import diffusion_loss
from trainers.families.sd1 import SCHEDULER
from trainers.families.sd2 import SCHEDULER as SD2_SCHEDULER


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_epsilon_objective_noises_as_ddpm_and_targets_the_noise():
    objective = NoisePrediction(SCHEDULER)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    times = torch.tensor([0, 500, 999])
    alphas = objective.scheduler.alphas_cumprod[times].view(-1, 1, 1, 1)
    expected = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
    assert torch.allclose(objective.noisy(latents, noise, times), expected, atol=1e-6)
    assert torch.equal(objective.target(latents, noise, times), noise)
    # the x0 an exact prediction implies is the clean latents
    x0 = objective.predicted_latents(expected, noise, times)
    assert torch.allclose(x0, latents, atol=1e-3)


def test_v_objective_targets_velocity_and_recovers_x0():
    objective = NoisePrediction(SD2_SCHEDULER)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    times = torch.tensor([10, 700])
    alphas = objective.scheduler.alphas_cumprod[times].view(-1, 1, 1, 1)
    velocity = alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    assert torch.allclose(objective.target(latents, noise, times), velocity, atol=1e-6)
    noisy = objective.noisy(latents, noise, times)
    assert torch.allclose(objective.predicted_latents(noisy, velocity, times), latents, atol=1e-4)


def test_min_snr_weight_clips_the_signal_to_noise_ratio():
    eps, v = NoisePrediction(SCHEDULER), NoisePrediction(SD2_SCHEDULER)
    times = torch.tensor([0, 999])
    assert eps.loss_weight(times, 0.0) is None
    snr = eps.scheduler.alphas_cumprod[times] / (1 - eps.scheduler.alphas_cumprod[times])
    assert torch.allclose(eps.loss_weight(times, 5.0), torch.clamp(snr, max=5.0) / snr)
    assert torch.allclose(v.loss_weight(times, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))
    # low timesteps have a huge SNR, so min-SNR damps them; high ones keep weight ~1
    assert eps.loss_weight(times, 5.0)[0] < 0.01 and eps.loss_weight(times, 5.0)[1] == 1


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ObjectiveError, match="sample"):
        NoisePrediction({**SCHEDULER, "prediction_type": "sample"})


def test_flow_matching_interpolates_and_targets_the_velocity():
    objective = FlowMatching(FlowMatchingOptions(sampling="uniform"))
    latents, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigmas = torch.tensor([0.25, 0.9])
    noisy = objective.noisy(latents, noise, sigmas)
    assert torch.allclose(noisy[0], 0.75 * latents[0] + 0.25 * noise[0])
    assert torch.allclose(noisy[1], 0.1 * latents[1] + 0.9 * noise[1], atol=1e-6)
    target = objective.target(latents, noise, sigmas)
    assert torch.equal(target, noise - latents)
    assert torch.allclose(objective.predicted_latents(noisy, target, sigmas), latents, atol=1e-5)
    assert torch.allclose(objective.model_timesteps(sigmas), torch.tensor([250.0, 900.0]))


@pytest.mark.parametrize("sampling", ["uniform", "sigmoid", "shift", "flux_shift", "mode"])
def test_every_sigma_sampling_stays_inside_zero_one_and_is_seeded(sampling):
    objective = FlowMatching(FlowMatchingOptions(sampling=sampling))
    latents = torch.zeros(1, 16, 64, 64)
    first = objective.sample_times(4000, _gen(3), latents)
    assert torch.equal(first, objective.sample_times(4000, _gen(3), latents))
    assert first.min() > 0 and first.max() < 1


def test_shift_moves_sigmas_toward_noise():
    latents = torch.zeros(1, 16, 64, 64)
    plain = FlowMatching(FlowMatchingOptions(sampling="sigmoid")).sample_times(4000, _gen(), latents)
    shifted = FlowMatching(FlowMatchingOptions(sampling="shift", shift=3.0)).sample_times(
        4000, _gen(), latents)
    assert abs(plain.mean().item() - 0.5) < 0.02  # logit-normal(0, 1) is centred
    assert shifted.mean() > plain.mean() + 0.1
    # the shift is SD3's: s * shift / (1 + (shift - 1) * s)
    assert torch.allclose(shifted, plain * 3 / (1 + 2 * plain), atol=1e-6)


def test_flux_shift_grows_with_the_image_size():
    objective = FlowMatching(FlowMatchingOptions(sampling="flux_shift"))
    small = objective.sample_times(4000, _gen(), torch.zeros(1, 16, 32, 32))   # 256 tokens
    large = objective.sample_times(4000, _gen(), torch.zeros(1, 16, 128, 128))  # 4096 tokens
    plain = FlowMatching(FlowMatchingOptions(sampling="sigmoid")).sample_times(
        4000, _gen(), torch.zeros(1, 16, 32, 32))
    # at 256 tokens mu is base_shift (0.5), at 4096 max_shift (1.15)
    e = math.exp(0.5)
    assert torch.allclose(small, e / (e + (1 / plain - 1)), atol=1e-6)
    assert large.mean() > small.mean()


def test_flow_loss_weightings():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    assert FlowMatching(FlowMatchingOptions(weighting="none")).loss_weight(sigmas) is None
    sqrt = FlowMatching(FlowMatchingOptions(weighting="sigma_sqrt")).loss_weight(sigmas)
    assert torch.allclose(sqrt, sigmas ** -2)
    cosmap = FlowMatching(FlowMatchingOptions(weighting="cosmap")).loss_weight(sigmas)
    assert torch.allclose(cosmap, 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2)))
    assert cosmap[1] > cosmap[0]  # cosmap weighs the middle of the path most


def test_flow_matching_refuses_min_snr_and_unknown_options():
    with pytest.raises(ObjectiveError, match="min-SNR"):
        FlowMatching().loss_weight(torch.tensor([0.5]), 5.0)
    with pytest.raises(ObjectiveError, match="timestep sampling: 'cosine'"):
        FlowMatching(FlowMatchingOptions(sampling="cosine"))
    with pytest.raises(ObjectiveError, match="loss weighting: 'snr'"):
        FlowMatching(FlowMatchingOptions(weighting="snr"))
    with pytest.raises(ObjectiveError, match="logit std"):
        FlowMatching(FlowMatchingOptions(logit_std=0))


class _Velocity(torch.nn.Module):
    """A 'network' that predicts noise - latents exactly when told them."""

    def __init__(self):
        super().__init__()
        self.latents = self.noise = None
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.seen = None

    def forward(self, noisy, timesteps, context):
        self.seen = timesteps

        class Out:
            sample = self.noise - self.latents + self.dummy
        return Out()


def test_the_step_trains_a_flow_model_on_the_objectives_target():
    net = _Velocity()
    latents = torch.randn(2, 16, 4, 4)
    objective = FlowMatching(FlowMatchingOptions(sampling="uniform"))
    # the step draws noise first, then sigmas, from one generator: repeat that to know the noise
    gen = _gen(7)
    net.noise = torch.randn(latents.shape, generator=gen)
    sigmas = objective.sample_times(2, gen, latents)
    net.latents = latents
    loss = diffusion_loss(net, objective, latents, torch.zeros(2, 1, 8), _gen(7),
                          device=torch.device("cpu"), dtype=torch.float32)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(net.seen, sigmas * 1000)
    net.latents = torch.zeros_like(latents)  # now the prediction is off by +latents
    off = diffusion_loss(net, objective, latents, torch.zeros(2, 1, 8), _gen(7),
                         device=torch.device("cpu"), dtype=torch.float32)
    assert off.item() == pytest.approx((latents ** 2).mean().item(), rel=1e-5)
