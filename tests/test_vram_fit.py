"""'Fit my GPU' (#19 item 6): the cheapest memory options that bring the estimate under the
card, in order, each said with why; a T4 gets fp16, flow models bf16; a job that cannot fit
says what it would need; detect without a GPU and unknown cards are refused by name."""
from __future__ import annotations

import pytest

from trainers.configs import DreamBoothConfig, LoraConfig
from trainers.memory_estimate import GB, estimate_for
from trainers.vram_fit import CHOICES, FitError, card_for, fit

SD15 = dict(model="sd15.safetensors", output_name="x", train_data_dir="d")


def test_a_lora_that_fits_after_mixed_precision_gets_only_that(data_paths):
    cfg = LoraConfig(**SD15, resolution=512).validate()
    assert estimate_for(cfg, data_paths).total > 8 * GB * 0.9
    fitted, said = fit(cfg, data_paths, card_for("8 GB"))
    assert fitted.mixed_precision == "bf16" and not fitted.gradient_checkpointing
    assert fitted.network_train_unet_only == cfg.network_train_unet_only
    assert said.startswith("Fits 8 GB: chose bf16 mixed precision") and "Estimated peak" in said
    assert estimate_for(fitted, data_paths).total <= 8 * GB * 0.9


def test_options_are_added_in_order_until_it_fits_and_a_t4_gets_fp16(data_paths):
    cfg = LoraConfig(**SD15, resolution=1024, train_batch_size=4).validate()
    fitted, said = fit(cfg, data_paths, card_for("16 GB (Colab T4)"))
    assert fitted.mixed_precision == "fp16"  # Turing has no native bf16
    assert fitted.network_train_unet_only and fitted.cache_text_encoder_outputs
    assert fitted.gradient_checkpointing
    order = [said.index(w) for w in ("fp16 mixed precision", "U-Net only", "gradient checkpointing")]
    assert order == sorted(order)
    assert estimate_for(fitted, data_paths).total <= 16 * GB * 0.9
    roomy, said = fit(cfg, data_paths, card_for("24 GB"))
    assert roomy.mixed_precision == "bf16"  # a recent card: bf16
    assert estimate_for(roomy, data_paths).total <= 24 * GB * 0.9


def test_settings_that_fit_are_left_alone(data_paths):
    cfg = LoraConfig(**SD15, resolution=256, mixed_precision="bf16").validate()
    fitted, said = fit(cfg, data_paths, card_for("24 GB"))
    assert fitted == cfg and "the settings fit as they are" in said


def test_flow_models_are_fitted_in_bf16_and_unmeasured_families_say_so(data_paths):
    import json
    for name, pipeline in (("zimage", "ZImagePipeline"), ("sd2", "StableDiffusionPipeline")):
        folder = data_paths.stable_diffusion / name
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024}))
    cfg = LoraConfig(model="zimage", output_name="x", train_data_dir="d", resolution=512,
                     network_train_unet_only=True).validate()
    fitted, said = fit(cfg, data_paths, card_for("24 GB"))
    assert fitted.mixed_precision == "bf16" and fitted.gradient_checkpointing
    assert not fitted.fp8_base and "scaled" not in said  # Z-Image's costs are measured
    with pytest.raises(FitError) as refused:
        fit(cfg, data_paths, card_for("8 GB"))  # even with all but one block swapped
    assert "block swap" in str(refused.value) and "scaled" not in str(refused.value)
    sd2 = LoraConfig(model="sd2", output_name="x", train_data_dir="d", resolution=2048,
                     train_batch_size=4, network_train_unet_only=True).validate()
    with pytest.raises(FitError, match="SD 2.x's activations are scaled from SD 1.x's"):
        fit(sd2, data_paths, card_for("8 GB"))


def test_a_lora_that_fits_only_with_block_swap_swaps_the_fewest_blocks_and_says_so(data_paths):
    import dataclasses
    import json
    folder = data_paths.stable_diffusion / "flux-dev"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    cfg = LoraConfig(model="flux-dev", output_name="x", train_data_dir="d", resolution=512,
                     network_train_unet_only=True).validate()
    budget = 16 * GB * 0.9
    fitted, said = fit(cfg, data_paths, card_for("16 GB (Colab T4)"))
    count = fitted.blocks_to_swap
    assert fitted.fp8_base and fitted.gradient_checkpointing and 0 < count < 57
    assert estimate_for(fitted, data_paths).total <= budget
    # every other option was not enough, and one block fewer would not fit
    assert estimate_for(dataclasses.replace(fitted, blocks_to_swap=0), data_paths).total > budget
    assert estimate_for(dataclasses.replace(fitted, blocks_to_swap=count - 1),
                        data_paths).total > budget
    assert f"block swap: the frozen weights of the last {count} of Flux.1's 57 denoiser " \
           "blocks wait in CPU memory" in said
    assert said.index("fp8 base weights") < said.index("block swap")
    # an SD 1.x LoRA that fits without it is not given one
    small, said = fit(LoraConfig(**SD15, resolution=512).validate(), data_paths, card_for("8 GB"))
    assert small.blocks_to_swap == 0 and "block swap" not in said


def test_a_job_that_cannot_fit_says_what_it_would_need(data_paths):
    cfg = DreamBoothConfig(model="sd15.safetensors", output_name="x", train_data_dir="d",
                           instance_prompt="a zxq dog", resolution=2048,  # 1024 fits fused
                           train_batch_size=8).validate()
    with pytest.raises(FitError, match=r"vram: even with .*gradient checkpointing.*the estimate "
                                       r"is \d+\.\d GB, more than 8 GB holds; lower the "
                                       r"resolution or the batch, or train a LoRA"):
        fit(cfg, data_paths, card_for("8 GB"))


def test_unknown_cards_and_detect_without_a_gpu_are_named(monkeypatch):
    with pytest.raises(FitError, match="vram: '6 GB' is not one of 8 GB, 12 GB"):
        card_for("6 GB")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(FitError, match="no NVIDIA GPU found"):
        card_for("detect")
    assert {card_for(c).gigabytes for c in CHOICES} == {8, 12, 16, 24}
