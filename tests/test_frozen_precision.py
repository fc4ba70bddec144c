"""Frozen base weights in the training precision (#19): a bf16 LoRA run stores the base model
in bf16 while its LoRA factors train in fp32, previews render, the file loads in diffusers, and
the next fp32 job gets an fp32 model; the memory estimate counts the halved bytes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.events import Preview
from tests.conftest import RecordingContext, demo_images_with_lora, kohya_photos
from tests.test_lora_training import lora_config
from trainers import models
from trainers.memory_estimate import estimate
from trainers.methods.lora import run


def test_a_bf16_lora_trains_fp32_factors_on_bf16_frozen_weights(data_paths, tmp_path):
    from trainers import lora_network
    folder = kohya_photos(tmp_path / "train")
    seen = {}
    original = lora_network.LoraNetwork.__init__

    def spy(self, unet, *args, **kwargs):
        original(self, unet, *args, **kwargs)
        seen["base"] = {p.dtype for n, p in unet.named_parameters() if "lora_" not in n}
        seen["factors"] = {p.dtype for p in self.unet_parameters()}

    lora_network.LoraNetwork.__init__ = spy
    try:
        ctx = RecordingContext(data_paths)
        path = run(lora_config(folder, mixed_precision="bf16", max_train_steps=3,
                               learning_rate=5e-3, sample_every_n_steps=3,
                               sample_prompts="zxq cat --w 64 --h 64 --s 2 --d 3"), ctx)
    finally:
        lora_network.LoraNetwork.__init__ = original
    assert seen == {"base": {torch.bfloat16}, "factors": {torch.float32}}
    # an fp32 reader (Create embedding's token tables) is not given the bf16 model
    assert models.cached_model(data_paths, "tiny-demo") is None
    assert [p.step for p in ctx.of(Preview)] == [3]
    assert len(ctx.losses) == 3 and all(np.isfinite(loss) for loss in ctx.losses)

    base, with_lora = demo_images_with_lora(data_paths, path)
    assert not np.allclose(base, with_lora)

    fp32 = models.load_model(data_paths, "tiny-demo")  # the next fp32 job: loaded again
    assert fp32.frozen_dtype == "fp32" and fp32.unet.dtype == torch.float32
    assert models.cached_model(data_paths, "tiny-demo") is fp32


def test_fp16_keeps_the_vae_in_fp32_and_an_unknown_precision_is_refused(data_paths):
    model = models.load_model(data_paths, "tiny-demo", exclusive=True)
    models.store_frozen_in(model, "fp16")
    assert model.unet.dtype == model.text_encoder.dtype == torch.float16
    assert model.vae.dtype == torch.float32 and model.frozen_dtype == "fp16"
    with pytest.raises(models.ModelError, match="unknown precision 'fp4'"):
        models.store_frozen_in(model, "fp4")


def test_the_estimate_counts_half_precision_frozen_weights():
    from trainers.configs import LoraConfig, TextualInversionConfig
    full = estimate(LoraConfig(mixed_precision="no"), "sdxl").parts["weights"]
    half = estimate(LoraConfig(mixed_precision="bf16"), "sdxl").parts["weights"]
    assert half == pytest.approx(full / 2)
    # textual inversion keeps the VAE on the device (a LoRA parks it once latents are cached)
    full, half, fp16 = (estimate(TextualInversionConfig(model="sdxl", mixed_precision=precision),
                                 "sdxl").parts["weights"] for precision in ("no", "bf16", "fp16"))
    assert half == pytest.approx(full / 2)
    assert half < fp16 < full  # the VAE stays fp32 under fp16


def _weight_bytes(module) -> int:
    from torch import nn
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.mark.parametrize("model", ["tiny-demo", "tiny-demo-flux"])
def test_fp8_base_halves_the_denoiser_weights_and_trains_close_to_bf16(family_paths, tmp_path,
                                                                       model):
    from trainers.fp8_weights import FP8
    folder = kohya_photos(tmp_path / "train")
    bf16 = models.load_model(family_paths, model, frozen_dtype="bf16")
    bf16_bytes = _weight_bytes(bf16.unet)
    extra = {"network_train_unet_only": True} if model == "tiny-demo-flux" else {}
    runs = {}
    for precision in ("bf16", "fp8"):
        ctx = RecordingContext(family_paths)
        runs[precision] = (run(lora_config(folder, model=model, output_name=f"m-{precision}",
                                           mixed_precision="bf16", fp8_base=precision == "fp8",
                                           max_train_steps=4, learning_rate=5e-3,
                                           sample_every_n_steps=4,
                                           sample_prompts="zxq cat --w 64 --h 64 --s 2 --d 3",
                                           **extra), ctx), ctx)
    fp8 = models.load_model(family_paths, model, frozen_dtype="fp8")
    assert fp8.frozen_dtype == "fp8" and fp8.text_encoder.dtype == torch.bfloat16
    assert {m.weight.dtype for m in fp8.unet.modules() if hasattr(m, "fp8_scale")} == {FP8}
    assert _weight_bytes(fp8.unet) * 2 == bf16_bytes
    losses = {p: np.array(ctx.losses) for p, (_, ctx) in runs.items()}
    assert np.all(np.isfinite(losses["fp8"]))
    # 8-bit weights change the loss by a little, not by what another batch would
    assert np.abs(losses["fp8"] - losses["bf16"]).max() < 0.1 * losses["bf16"].mean()
    assert [p.step for p in runs["fp8"][1].of(Preview)] == [4]
    if model == "tiny-demo":
        base, with_lora = demo_images_with_lora(family_paths, runs["fp8"][0])
        assert not np.allclose(base, with_lora)


def test_fp8_base_needs_mixed_precision_and_the_estimate_counts_one_byte():
    from core.config import ConfigError
    from trainers.configs import LoraConfig
    with pytest.raises(ConfigError, match="fp8_base: needs mixed precision"):
        LoraConfig(model="tiny-demo", output_name="x", train_data_dir="d", fp8_base=True).validate()
    bf16 = estimate(LoraConfig(mixed_precision="bf16"), "flux1").parts["weights"]
    fp8 = estimate(LoraConfig(mixed_precision="bf16", fp8_base=True), "flux1").parts["weights"]
    unet = 11.9e9
    assert bf16 - fp8 == pytest.approx(unet)
