"""Z-Image on its tiny demo: conditioning as ZImagePipeline encodes it, the transformer's
output turned into Danlu's flow-matching velocity (checked against the pipeline's own Euler
step), LoRA trained through the shared step with previews, files that diffusers'
ZImagePipeline loads, exact resume, and what a Z-Image run refuses."""
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

ZIMAGE = "tiny-demo-zimage"


def lora_config(folder, model=ZIMAGE, **changes):
    return flow_lora_config(folder, model, **{"output_name": "zlora", **changes})


zimage_pipeline = family_pipeline


def image(pipe, prompt="zxq cat"):
    return pipe(prompt, num_inference_steps=2, height=64, width=64, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def with_network(pipe, path, strength=1.0):
    from trainers.zimage_lora import ZIMAGE_LAYOUT
    return danlu_network(pipe, path, ZIMAGE_LAYOUT, strength)


def test_zimage_demo_is_a_zimage_model_and_encodes_captions_as_its_pipeline(family_paths):
    from trainers.conditioning import prompt_encoder
    from trainers.families import folder_family, guess_family
    model = load_model(family_paths, ZIMAGE)
    assert model.family == "zimage" and type(model.unet).__name__ == "ZImageTransformer2DModel"
    assert folder_family(family_paths.cache / ZIMAGE) == "zimage"
    assert guess_family(family_paths, ZIMAGE) == "zimage"
    captions = ["zxq cat, a photo", "a dog"]
    encoded = prompt_encoder(model).encode(list(captions))
    pipe = zimage_pipeline(family_paths.cache / ZIMAGE)
    theirs, _ = pipe.encode_prompt(list(captions), "cpu", do_classifier_free_guidance=False)
    ours = encoded.trimmed()
    assert encoded.context.shape[1] == 512
    assert [len(o) for o in ours] == [len(t) for t in theirs]
    for mine, pipelines in zip(ours, theirs):
        assert torch.allclose(mine, pipelines, atol=1e-5)


def test_zimage_prediction_is_the_velocity_the_pipeline_integrates(family_paths):
    """One pipeline step from sigma to 0 is latents - sigma * v: the hook's output is v."""
    from trainers.conditioning import prompt_encoder, unet_inputs
    from trainers.zimage_model import zimage_prediction
    model = load_model(family_paths, ZIMAGE)
    pipe = zimage_pipeline(family_paths.cache / ZIMAGE)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    stepped = pipe("zxq cat", sigmas=[0.6], height=64, width=64, guidance_scale=0.0,
                   latents=latents.clone(), output_type="latent").images
    sigma = pipe.scheduler.sigmas[0]
    assert 0.6 < float(sigma) < 1.0  # the scheduler's shift moved it
    with torch.no_grad():
        context, added = unet_inputs(prompt_encoder(model).encode(["zxq cat"]), latents)
        velocity = zimage_prediction(model.unet, latents, (sigma * 1000).reshape(1), context,
                                     {**added, "guidance": torch.ones(1)}, torch.float32)
    assert velocity.shape == latents.shape
    assert torch.allclose(latents - sigma * velocity, stepped, atol=1e-5)
    with pytest.raises(ValueError, match="2x2 patches"):
        zimage_prediction(model.unet, torch.randn(1, 16, 7, 8), torch.ones(1), context, added,
                          torch.float32)


def test_zimage_lora_trains_previews_and_saves_files_diffusers_loads(family_paths, pictures):
    model = load_model(family_paths, ZIMAGE)
    digests = {n: module_digest(getattr(model, n)) for n in ("unet", "text_encoder", "vae")}
    ctx = RecordingContext(family_paths)
    path = run(lora_config(pictures, sample_every_n_steps=2, save_diffusers_format=True,
                           sample_prompts="zxq cat --w 64 --h 64 --s 2"), ctx)
    assert [p.step for p in ctx.of(Preview)] == [0, 2, 4]
    state, meta = load_lora(path)
    assert sorted({k.split(".")[0] for k in state}) == sorted(f"lora_unet_layers_0_{n}" for n in (
        "attention_to_q", "attention_to_k", "attention_to_v", "attention_to_out_0",
        "feed_forward_w1", "feed_forward_w2", "feed_forward_w3"))
    assert state["lora_unet_layers_0_attention_to_q.lora_down.weight"].shape == (4, 32)
    assert float(state["lora_unet_layers_0_attention_to_q.alpha"]) == pytest.approx(2.0)
    assert meta["ss_base_model_version"] == "zimage"
    assert meta["ss_network_module"] == "networks.lora_zimage"
    assert "modelspec.prediction_type" not in meta and meta["ss_steps"] == "4"
    assert {n: module_digest(getattr(model, n)) for n in digests} == digests

    pipe = zimage_pipeline(family_paths.cache / ZIMAGE)
    base = image(pipe)
    network = with_network(pipe, path)
    ours = image(pipe)
    network.set_strength(0.0)
    assert np.array_equal(image(pipe), base)  # strength 0 is the base model exactly
    network.remove()
    assert not np.allclose(ours, base)
    pipe.load_lora_weights(str(path))
    adapted = [m for m in pipe.transformer.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(adapted) == 7
    assert np.allclose(image(pipe), ours, atol=1e-5)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(path.with_name("zlora-diffusers")))
    assert np.allclose(image(pipe), ours, atol=1e-5)


def test_zimage_lora_lowers_the_loss_on_its_batch_and_resumes_exactly(family_paths, pictures):
    import shutil

    from tests.conftest import photo
    from trainers.conditioning import prompt_encoder, unet_inputs
    from trainers.lora_network import LoraNetwork, LoraSpec
    from trainers.step import diffusion_loss
    from trainers.zimage_lora import ZIMAGE_LAYOUT
    from trainers.zimage_model import zimage_prediction
    model = load_model(family_paths, ZIMAGE)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        context, added = unet_inputs(prompt_encoder(model).encode(["zxq cat"]), latents)

    def loss():
        with torch.no_grad():
            return float(sum(diffusion_loss(model.unet, model.objective(), latents, context,
                                            torch.Generator().manual_seed(k), added_cond=added,
                                            predict=zimage_prediction) for k in range(8)))
    before = loss()
    shutil.rmtree(pictures / "2_zxq cat")
    one = pictures / "2_zxq cat"
    one.mkdir()
    photo(0, 64).save(one / "a.png")
    (one / "a.txt").write_text("zxq cat")
    path = run(lora_config(pictures, max_train_steps=30, learning_rate=2e-2),
               RecordingContext(family_paths))
    state, _ = load_lora(path)
    with LoraNetwork(model.unet, None, LoraSpec(rank=4, alpha=2.0, train_text_encoder=False),
                     layout=ZIMAGE_LAYOUT) as network:
        network.load_kohya_state_dict(state)
        assert loss() < before

    cfg = lora_config(pictures, output_name="resumed", max_train_steps=5,
                      lr_scheduler="cosine", train_batch_size=1)
    repeat_with_interruption(run, cfg, family_paths, load=lambda p: load_lora(p)[0],
                             reset=lambda: (family_paths.lora / "resumed.safetensors").unlink())


def test_zimage_runs_refuse_what_does_not_apply(family_paths, pictures):
    from trainers.preflight import check_before_queueing
    for changes, expected in [
            ({"network_train_unet_only": False}, "Z-Image has no text-encoder LoRA"),
            ({"conv_dim": 4}, "conv_dim"), ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
            ({"resolution": 72}, "resolution: Z-Image needs a multiple of 16")]:
        with pytest.raises(ConfigError, match=expected):
            check_before_queueing(lora_config(pictures, **changes), family_paths)
    check_before_queueing(lora_config(pictures), family_paths)  # the defaults pass
