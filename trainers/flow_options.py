"""How a run draws its timesteps and weighs its loss (sd-scripts' names): a flow-matching run's
sigmas and weighting, a noise-prediction run's extra loss weights; torch-free, so configs and the
page can name the choices. The objectives themselves are trainers/objectives.py."""
from __future__ import annotations

from dataclasses import dataclass

SIGMA_SAMPLINGS = ("uniform", "sigmoid", "shift", "flux_shift", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


class ObjectiveError(ValueError):
    pass


@dataclass(frozen=True)
class FlowMatchingOptions:
    """How sigmas are drawn and the loss weighted (sd-scripts' names)."""
    sampling: str = "sigmoid"     # uniform | sigmoid (logit-normal) | shift | flux_shift | mode
    logit_mean: float = 0.0       # logit-normal mean (diffusers' logit_mean)
    logit_std: float = 1.0        # logit-normal std (sd-scripts' sigmoid_scale)
    shift: float = 3.0            # discrete_flow_shift, for `shift`
    mode_scale: float = 1.29      # for `mode`
    base_shift: float = 0.5       # Flux's resolution-dependent shift: mu from 256 to 4096 tokens
    max_shift: float = 1.15
    weighting: str = "none"       # none | sigma_sqrt | cosmap
    guidance: float = 1.0         # the guidance value a guidance-distilled model is fed

    def validate(self) -> None:
        if self.sampling not in SIGMA_SAMPLINGS:
            raise ObjectiveError(f"timestep sampling: {self.sampling!r} is not one of "
                                 f"{', '.join(SIGMA_SAMPLINGS)}")
        if self.weighting not in FLOW_WEIGHTINGS:
            raise ObjectiveError(f"loss weighting: {self.weighting!r} is not one of "
                                 f"{', '.join(FLOW_WEIGHTINGS)}")
        if not self.logit_std > 0:
            raise ObjectiveError(f"logit std: must be above 0, got {self.logit_std}")
        if not self.shift > 0:
            raise ObjectiveError(f"discrete flow shift: must be above 0, got {self.shift}")
        if not self.guidance >= 0:
            raise ObjectiveError(f"guidance scale: must be 0 or more, got {self.guidance}")


@dataclass(frozen=True)
class NoiseWeighting:
    """Extra per-image loss weights of a noise-prediction (SD) run, as kohya computes them."""
    v_like_noise: bool = False  # scale_v_pred_loss_like_noise_pred: x SNR / (SNR + 1)
    debiased: bool = False      # debiased_estimation_loss: x 1 / sqrt(SNR)
