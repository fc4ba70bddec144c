"""SDXL v-prediction with zero terminal SNR (NoobAI-XL v-pred style, #21): the kohya options
change the run's noise schedule and loss weights (not the cached model's), files carry kohya's
metadata, an SDXL single file's `v_pred` / `ztsnr` keys are read on load and written by
DreamBooth, and options that cannot apply are refused by name."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from core.events import Preview
from tests.conftest import RecordingContext
from tests.test_sdxl import KOHYA, SDXL, lora_config
from trainers.flow_options import NoiseWeighting
from trainers.loop import TrainingError
from trainers.models import load_model
from trainers.objectives import NoisePrediction

ROOT = Path(__file__).resolve().parent.parent
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": "v_prediction"}


def test_v_like_noise_and_debiased_weights_follow_kohyas_formulas():
    times = torch.tensor([0, 10, 500, 999])
    plain = NoisePrediction(SCHEDULE)
    alphas = plain.scheduler.alphas_cumprod[times]
    snr = alphas / (1 - alphas)
    capped = snr.clamp(max=1000)
    assert plain.loss_weight(times) is None
    like = NoisePrediction(SCHEDULE, NoiseWeighting(v_like_noise=True)).loss_weight(times)
    assert torch.allclose(like, capped / (capped + 1))
    both = NoisePrediction(SCHEDULE, NoiseWeighting(True, True)).loss_weight(times, 5.0)
    assert torch.allclose(both, snr.clamp(max=5) / (snr + 1) * capped / (capped + 1)
                          / capped.sqrt())
    # zero terminal SNR: the last timestep is pure noise, and every weight stays finite
    zero = NoisePrediction({**SCHEDULE, "rescale_betas_zero_snr": True}, NoiseWeighting(True, True))
    assert float(zero.scheduler.alphas_cumprod[-1]) == 0.0
    assert torch.isfinite(zero.loss_weight(times, 5.0)).all()
    eps = NoisePrediction({**SCHEDULE, "prediction_type": "epsilon", "rescale_betas_zero_snr": True})
    assert torch.isfinite(eps.loss_weight(times, 5.0)).all()


def test_an_sdxl_lora_trains_with_v_prediction_and_zero_terminal_snr(family_paths, pictures):  # noqa: F811
    from trainers.formats.lora import load_lora
    from trainers.kohya_training import with_schedule
    from trainers.methods.lora import run
    cfg = lora_config(pictures, v_parameterization=True, zero_terminal_snr=True,
                      scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True,
                      sample_every_n_steps=3, sample_prompts="zxq cat --w 64 --h 64 --s 3")
    model = load_model(family_paths, SDXL)
    seen = with_schedule(cfg, model)
    objective = seen.objective(noise=cfg.noise_weighting())
    assert objective.kind == "v_prediction" and float(objective.scheduler.alphas_cumprod[-1]) == 0
    assert seen.unet is model.unet and model.prediction_type == "epsilon"  # the cache keeps its own
    ctx = RecordingContext(family_paths)
    path = run(cfg, ctx)
    assert all(np.isfinite(ctx.losses)) and [p.step for p in ctx.of(Preview)] == [3]
    _, meta = load_lora(path)
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_zero_terminal_snr"] == meta["ss_debiased_estimation"] == "True"
    assert "ss_zero_terminal_snr" not in load_lora(run(lora_config(
        pictures, output_name="plain"), RecordingContext(family_paths)))[1]
    assert load_model(family_paths, SDXL).prediction_type == "epsilon"


def test_v_only_options_are_refused_where_they_cannot_apply(family_paths, pictures):  # noqa: F811
    from trainers.methods.lora import run
    with pytest.raises(TrainingError, match="scale_v_pred_loss_like_noise_pred: applies to "
                                            "v-prediction; tiny-demo-sdxl predicts epsilon"):
        run(lora_config(pictures, scale_v_pred_loss_like_noise_pred=True),
            RecordingContext(family_paths))
    with pytest.raises(TrainingError, match="zero_terminal_snr: Flux.1 is a flow-matching"):
        run(lora_config(pictures, model="tiny-demo-flux", zero_terminal_snr=True,
                        network_train_unet_only=True), RecordingContext(family_paths))


def test_sdxl_dreambooth_v_pred_file_carries_the_markers_and_loads_as_v(family_paths, pictures):  # noqa: F811
    import safetensors
    from trainers.configs import DreamBoothConfig
    from trainers.methods.dreambooth import run
    path = run(DreamBoothConfig(model=SDXL, output_name="vpredxl", train_data_dir=str(pictures),
                                instance_prompt="a photo of zxq cat", max_train_steps=2,
                                learning_rate=1e-4, sample_at_first=False, seed=3,
                                v_parameterization=True, zero_terminal_snr=True,
                                **KOHYA).validate(), RecordingContext(family_paths))
    with safetensors.safe_open(str(path), "pt") as handle:
        assert {"v_pred", "ztsnr"} <= set(handle.keys())
        assert handle.get_tensor("v_pred").numel() == 0
    tuned = load_model(family_paths, path.name)
    assert tuned.prediction_type == "v_prediction"
    assert tuned.scheduler_config["rescale_betas_zero_snr"] is True
    assert tuned.scheduler_config["timestep_spacing"] == "trailing"
    # the same weights without the markers load as epsilon
    plain = path.with_name("plain.safetensors")
    with safetensors.safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k not in ("v_pred", "ztsnr")}
        metadata = handle.metadata()
    safetensors.torch.save_file(tensors, str(plain), metadata=metadata)
    assert load_model(family_paths, plain.name).prediction_type == "epsilon"


def test_the_noobai_preset_in_the_docs_is_a_valid_lora_config():
    import tomllib
    from trainers.configs import LoraConfig
    text = (ROOT / "docs" / "sdxl-vpred.md").read_text()
    preset = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    cfg = LoraConfig(**tomllib.loads(preset)).validate()
    assert cfg.v_parameterization and cfg.zero_terminal_snr
