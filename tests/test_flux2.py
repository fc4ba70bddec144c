"""Flux.2 Klein on its tiny demo: conditioning as Flux2KleinPipeline encodes it, the VAE as the
transformer sees it (2x2 patches, batch-norm normalised), the transformer's output as Danlu's
flow-matching velocity (checked against the pipeline's own Euler step), LoRA trained through the
shared step with previews, kohya Flux.2 files that diffusers' Flux2KleinPipeline loads, exact
resume, what a Flux.2 run refuses, and Klein 4B's real shape."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.events import Preview
from tests.conftest import RecordingContext, repeat_with_interruption
from tests.flow_family_checks import danlu_network, family_pipeline, flow_lora_config
from tests.test_textual_inversion import module_digest
from trainers.formats.lora import load_lora
from trainers.methods.lora import run
from trainers.models import load_model

FLUX2 = "tiny-demo-flux2"
DOUBLE = ("img_attn_proj", "img_attn_qkv", "img_mlp_0", "img_mlp_2",
          "txt_attn_proj", "txt_attn_qkv", "txt_mlp_0", "txt_mlp_2")
SINGLE = ("linear1", "linear2")


def lora_config(folder, model=FLUX2, **changes):
    return flow_lora_config(folder, model, **{"output_name": "klein", **changes})


flux2_pipeline = family_pipeline


def image(pipe, prompt="zxq cat"):
    return pipe(prompt=prompt, num_inference_steps=2, height=64, width=64, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def with_network(pipe, path, strength=1.0):
    from trainers.flux2_lora import FLUX2_LAYOUT
    return danlu_network(pipe, path, FLUX2_LAYOUT, strength)


def test_flux2_demo_is_a_klein_model_and_encodes_captions_as_its_pipeline(family_paths):
    from trainers.conditioning import prompt_encoder
    from trainers.families import folder_family, guess_family
    model = load_model(family_paths, FLUX2)
    assert model.family == "flux2_klein"
    assert type(model.unet).__name__ == "Flux2Transformer2DModel"
    assert folder_family(family_paths.cache / FLUX2) == "flux2_klein"
    assert guess_family(family_paths, FLUX2) == "flux2_klein"
    captions = ["zxq cat, a photo", "a dog"]
    encoded = prompt_encoder(model).encode(list(captions))
    pipe = flux2_pipeline(family_paths.cache / FLUX2)
    theirs, _ids = pipe.encode_prompt(list(captions), "cpu")
    assert encoded.shape == theirs.shape == (2, 512, 3 * 16)
    assert torch.allclose(encoded, theirs, atol=1e-5)


def test_flux2_vae_view_is_the_pipelines_normalised_patched_latents(family_paths):
    from trainers.flux2_model import flux2_vae
    pipe = flux2_pipeline(family_paths.cache / FLUX2)
    latents = flux2_vae(pipe.vae)
    assert flux2_vae(latents) is latents
    assert latents.config.scaling_factor == 1.0 and not latents.config.shift_factor
    assert 2 ** (len(latents.config.block_out_channels) - 1) == 16
    pixels = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        dist = latents.encode(pixels).latent_dist
        assert dist.mean.shape == (1, 128, 4, 3)
        assert torch.allclose(dist.mean, pipe._encode_vae_image(pixels, None), atol=1e-5)
        # decoding takes it back as the pipeline does after its last step
        decoded = latents.decode(dist.mean).sample
        mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        raw = pipe._unpatchify_latents(dist.mean * std + mean)
        assert torch.allclose(decoded, pipe.vae.decode(raw).sample, atol=1e-5)
    assert not torch.allclose(mean, torch.zeros_like(mean))  # the demo's statistics show


def test_flux2_prediction_is_the_velocity_the_pipeline_integrates(family_paths):
    """One pipeline step from sigma to 0 is latents - sigma * v: the hook's output is v."""
    from trainers.conditioning import prompt_encoder, unet_inputs
    from trainers.flux2_model import flux2_prediction
    model = load_model(family_paths, FLUX2)
    pipe = flux2_pipeline(family_paths.cache / FLUX2)
    latents = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        context, added = unet_inputs(prompt_encoder(model).encode(["zxq cat"]), latents)
    assert added is None
    stepped = pipe(prompt_embeds=context, sigmas=[0.6], height=64, width=64, guidance_scale=1.0,
                   latents=latents.clone(), output_type="latent").images
    sigma = pipe.scheduler.sigmas[0]
    assert 0.6 < float(sigma) < 1.0  # the scheduler's shift moved it
    with torch.no_grad():
        velocity = flux2_prediction(model.unet, latents, (sigma * 1000).reshape(1), context,
                                    added, torch.float32)
    assert velocity.shape == latents.shape
    # the pipeline hands back its latents un-normalised and unpatched for the VAE
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    ours = pipe._unpatchify_latents((latents - sigma * velocity) * std + mean)
    assert torch.allclose(ours, stepped, atol=1e-5)
    with pytest.raises(ValueError, match="32 channels; the transformer takes 128"):
        flux2_prediction(model.unet, torch.randn(1, 32, 8, 8), torch.ones(1), context, added,
                         torch.float32)


def test_flux2_lora_trains_previews_and_saves_files_diffusers_loads(family_paths, pictures):
    model = load_model(family_paths, FLUX2)
    digests = {n: module_digest(getattr(model, n)) for n in ("unet", "text_encoder", "vae")}
    ctx = RecordingContext(family_paths)
    path = run(lora_config(pictures, sample_every_n_steps=2, save_diffusers_format=True,
                           sample_prompts="zxq cat --w 64 --h 64 --s 2"), ctx)
    assert [p.step for p in ctx.of(Preview)] == [0, 2, 4]
    state, meta = load_lora(path)
    assert sorted({k.split(".")[0] for k in state}) == sorted(
        [f"lora_unet_double_blocks_0_{n}" for n in DOUBLE]
        + [f"lora_unet_single_blocks_0_{n}" for n in SINGLE])
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)
    assert float(state["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == pytest.approx(6.0)
    # the single block's fused qkv + SwiGLU input is one Linear already: 3 * 32 + 2 * 96
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 192, 4)
    assert meta["ss_base_model_version"] == "flux2"
    assert meta["ss_network_module"] == "networks.lora_flux_2"
    assert meta["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert "modelspec.prediction_type" not in meta and meta["ss_steps"] == "4"
    assert {n: module_digest(getattr(model, n)) for n in digests} == digests

    pipe = flux2_pipeline(family_paths.cache / FLUX2)
    base = image(pipe)
    network = with_network(pipe, path)
    ours = image(pipe)
    network.set_strength(0.0)
    assert np.array_equal(image(pipe), base)  # strength 0 is the base model exactly
    network.remove()
    assert not np.allclose(ours, base)
    pipe.load_lora_weights(str(path))
    adapted = [m for m in pipe.transformer.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(adapted) == 12 + 2  # q/k/v split again in the double block
    assert np.allclose(image(pipe), ours, atol=1e-5)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(path.with_name("klein-diffusers")))
    assert np.allclose(image(pipe), ours, atol=1e-5)


def test_flux2_lora_resumes_exactly(family_paths, pictures):
    cfg = lora_config(pictures, output_name="resumed", max_train_steps=5,
                      lr_scheduler="cosine", train_batch_size=1)
    repeat_with_interruption(run, cfg, family_paths, load=lambda p: load_lora(p)[0],
                             reset=lambda: (family_paths.lora / "resumed.safetensors").unlink())


def test_flux2_runs_refuse_what_does_not_apply(family_paths, pictures):
    from trainers.preflight import check_before_queueing
    for changes, expected in [
            ({"network_train_unet_only": False}, "Flux.2 Klein has no text-encoder LoRA"),
            ({"conv_dim": 4}, "conv_dim"), ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
            ({"resolution": 72}, "resolution: Flux.2 Klein needs a multiple of 16")]:
        with pytest.raises(ConfigError, match=expected):
            check_before_queueing(lora_config(pictures, **changes), family_paths)
    check_before_queueing(lora_config(pictures), family_paths)  # the defaults pass


def test_klein_4b_shape_gives_the_family_params_and_the_lora_names():
    """FLUX.2-klein-4B's published transformer config, built on the meta device."""
    from diffusers import AutoencoderKLFlux2

    from trainers import families
    from trainers.flux2_lora import FLUX2_LAYOUT, metadata
    from trainers.flux_lora import slot_sizes
    from trainers.published_shapes import shape
    transformer = shape("flux2_klein").build()
    with torch.device("meta"):
        vae = AutoencoderKLFlux2()
    params = families.get("flux2_klein").params
    count = sum(p.numel() for p in transformer.parameters())
    assert abs(count - params[0]) / count < 0.01  # 3.88 B
    count = sum(p.numel() for p in vae.parameters())
    assert abs(count - params[2]) / count < 0.01
    targets = FLUX2_LAYOUT.denoiser_targets(transformer, conv=False)
    assert len(targets) == 5 * 12 + 20 * 2
    files = {t.name.split("@")[0] for t in targets}
    assert files == {f"lora_unet_double_blocks_{i}_{n}" for i in range(5) for n in DOUBLE} | {
        f"lora_unet_single_blocks_{i}_{n}" for i in range(20) for n in SINGLE}
    fused = slot_sizes({t.name: transformer.get_submodule(t.path).out_features for t in targets})
    assert fused["lora_unet_double_blocks_4_txt_attn_qkv"] == (3072, 3072, 3072)

    class Model:
        unet = transformer
    assert metadata(Model)["modelspec.architecture"] == "Flux.2-klein-4b/lora"
