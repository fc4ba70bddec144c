"""Chroma on its tiny demo: conditioning as ChromaPipeline encodes it, the transformer call with
Chroma's text mask applied as a keep/drop mask (checked against the pipeline's own Euler step),
LoRA trained through the shared step with previews, files in kohya's Flux names that diffusers'
ChromaPipeline loads, exact resume, what a Chroma run refuses, and Chroma1-HD's real shape."""
from __future__ import annotations

import shutil

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

CHROMA = "tiny-demo-chroma"
DOUBLE = ("img_attn_proj", "img_attn_qkv", "img_mlp_0", "img_mlp_2",
          "txt_attn_proj", "txt_attn_qkv", "txt_mlp_0", "txt_mlp_2")
SINGLE = ("linear1", "linear2")


def lora_config(folder, model=CHROMA, **changes):
    return flow_lora_config(folder, model, **{"output_name": "chromalora", **changes})


chroma_pipeline = family_pipeline


def image(pipe, prompt="zxq cat"):
    """As Danlu's previews call it: the prompt encoder's trimmed states and boolean masks."""
    from trainers.chroma_model import ChromaPromptEncoder
    embeds = ChromaPromptEncoder(pipe).encode([prompt, "blurry"]).pipeline_embeds()
    return pipe(**embeds, num_inference_steps=2, height=64, width=64, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def with_network(pipe, path, strength=1.0):
    from trainers.chroma_lora import CHROMA_LAYOUT
    return danlu_network(pipe, path, CHROMA_LAYOUT, strength)


def test_chroma_demo_is_a_chroma_model_and_encodes_captions_as_its_pipeline(family_paths):
    from trainers.conditioning import prompt_encoder
    from trainers.families import folder_family, guess_family
    model = load_model(family_paths, CHROMA)
    assert model.family == "chroma" and type(model.unet).__name__ == "ChromaTransformer2DModel"
    assert folder_family(family_paths.cache / CHROMA) == "chroma"
    assert guess_family(family_paths, CHROMA) == "chroma"
    captions = ["zxq cat, a photo", "a dog"]
    encoded = prompt_encoder(model).encode(list(captions))
    pipe = chroma_pipeline(family_paths.cache / CHROMA)
    context, _ids, mask, *_ = pipe.encode_prompt(list(captions), do_classifier_free_guidance=False)
    assert encoded.context.shape[1] == 512
    assert torch.allclose(encoded.context, context, atol=1e-5)
    assert torch.equal(encoded.mask, mask > 0.5)
    lengths = [len(pipe.tokenizer(c).input_ids) for c in captions]
    assert [len(row) for row in encoded.trimmed()] == [n + 1 for n in lengths]  # + one pad


def test_chroma_prediction_masks_the_padding_and_is_what_the_pipeline_integrates(family_paths):
    from trainers.chroma_model import chroma_prediction
    from trainers.conditioning import prompt_encoder, unet_inputs
    from trainers.flux_model import image_ids, pack, unpack
    model = load_model(family_paths, CHROMA)
    pipe = chroma_pipeline(family_paths.cache / CHROMA)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([0.3, 0.8])
    encoded = prompt_encoder(model).encode(["zxq cat, a photo of a cat on a mat", "a dog"])
    context, added = unet_inputs(encoded, latents)
    with torch.no_grad():
        ours = chroma_prediction(model.unet, latents, sigmas * 1000, context, added, torch.float32)
        # the pipeline's call on the padded states, its mask made boolean (keep / drop)
        mask = pipe._prepare_attention_mask(2, 16, torch.float32, encoded.mask)
        theirs = model.unet(hidden_states=pack(latents), timestep=sigmas,
                            encoder_hidden_states=context, txt_ids=torch.zeros(512, 3),
                            img_ids=image_ids(8, 8, "cpu", torch.float32), attention_mask=mask,
                            return_dict=False)[0]
        alone = [chroma_prediction(model.unet, latents[i:i + 1], sigmas[i:i + 1] * 1000,
                                   context[i:i + 1], {"pooled_projections": encoded.pooled[i:i + 1]},
                                   torch.float32) for i in range(2)]
        # diffusers' float mask is added to the attention scores: the padding is not dropped
        floats = model.unet(hidden_states=pack(latents), timestep=sigmas,
                            encoder_hidden_states=context, txt_ids=torch.zeros(512, 3),
                            img_ids=image_ids(8, 8, "cpu", torch.float32),
                            attention_mask=mask.float(), return_dict=False)[0]
    assert torch.allclose(ours, unpack(theirs, 8, 8), atol=1e-5)
    assert torch.allclose(ours, torch.cat(alone), atol=1e-5)
    assert not torch.allclose(ours, unpack(floats, 8, 8), atol=1e-3)

    # under gradient checkpointing (diffusers' single blocks then drop the mask) a batch of
    # different caption lengths still gives the same prediction
    model.unet.enable_gradient_checkpointing()
    try:
        checkpointed = chroma_prediction(model.unet, latents, sigmas * 1000, context, added,
                                         torch.float32)
    finally:
        model.unet.disable_gradient_checkpointing()
    assert torch.allclose(checkpointed.detach(), ours, atol=1e-5)

    # one pipeline step from sigma to 0 with the preview's arguments is latents - sigma * v
    one = latents[:1]
    stepped = pipe(**encoded.pipeline_embeds(), sigmas=[0.6], height=64, width=64,
                   guidance_scale=1.0, latents=pack(one), output_type="latent").images
    sigma = pipe.scheduler.sigmas[0]
    with torch.no_grad():
        velocity = chroma_prediction(model.unet, one, (sigma * 1000).reshape(1),
                                     context[:1], {"pooled_projections": encoded.pooled[:1]},
                                     torch.float32)
    assert torch.allclose(pack(one - sigma * velocity), stepped, atol=1e-5)
    with pytest.raises(ValueError, match="2x2 patches"):
        chroma_prediction(model.unet, torch.randn(1, 16, 7, 8), torch.ones(1), context[:1],
                          {"pooled_projections": encoded.pooled[:1]}, torch.float32)
    with pytest.raises(ValueError, match="no caption mask"):
        chroma_prediction(model.unet, one, torch.ones(1), context[:1], None, torch.float32)


def test_chroma_lora_trains_previews_and_saves_kohya_flux_names(family_paths, pictures):
    model = load_model(family_paths, CHROMA)
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
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 128, 16)
    assert meta["ss_base_model_version"] == "chroma"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "chroma/lora"
    assert "modelspec.prediction_type" not in meta and meta["ss_steps"] == "4"
    assert {n: module_digest(getattr(model, n)) for n in digests} == digests

    pipe = chroma_pipeline(family_paths.cache / CHROMA)
    base = image(pipe)
    network = with_network(pipe, path)
    ours = image(pipe)
    network.set_strength(0.0)
    assert np.array_equal(image(pipe), base)  # strength 0 is the base model exactly
    network.remove()
    assert not np.allclose(ours, base)
    pipe.load_lora_weights(str(path.with_name("chromalora-diffusers")))
    assert np.allclose(image(pipe), ours, atol=1e-5)


def _double_block_only_demo(family_paths) -> str:
    """The demo without its single-stream block: diffusers' kohya Flux converter (which
    ChromaPipeline uses) splits single blocks' linear1 at the real widths 3072 / 12288 only."""
    from diffusers import ChromaTransformer2DModel
    source = family_paths.cache / CHROMA
    target = family_paths.stable_diffusion / "chroma-double-only"
    shutil.copytree(source, target)
    config = dict(ChromaTransformer2DModel.load_config(source / "transformer"))
    config["num_single_layers"] = 0
    torch.manual_seed(0)
    ChromaTransformer2DModel.from_config(config).save_pretrained(target / "transformer")
    return target.name


def test_kohya_chroma_file_loads_in_chroma_pipeline_like_danlus_network(family_paths, pictures):
    name = _double_block_only_demo(family_paths)
    path = run(lora_config(pictures, model=name, output_name="double"),
               RecordingContext(family_paths))
    pipe = chroma_pipeline(family_paths.stable_diffusion / name)
    base = image(pipe)
    network = with_network(pipe, path)
    ours = image(pipe)
    network.remove()
    pipe.load_lora_weights(str(path))
    adapted = [m for m in pipe.transformer.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(adapted) == 12  # every Linear of the double block, q/k/v split again
    loaded = image(pipe)
    assert not np.allclose(loaded, base)
    assert np.allclose(loaded, ours, atol=1e-4)


def test_chroma_lora_resumes_exactly(family_paths, pictures):
    cfg = lora_config(pictures, output_name="resumed", max_train_steps=5,
                      lr_scheduler="cosine", train_batch_size=1)
    repeat_with_interruption(run, cfg, family_paths, load=lambda p: load_lora(p)[0],
                             reset=lambda: (family_paths.lora / "resumed.safetensors").unlink())


def test_chroma_runs_refuse_what_does_not_apply(family_paths, pictures):
    from trainers.preflight import check_before_queueing
    for changes, expected in [
            ({"network_train_unet_only": False}, "Chroma has no text-encoder LoRA"),
            ({"conv_dim": 4}, "conv_dim"), ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
            ({"resolution": 72}, "resolution: Chroma needs a multiple of 16")]:
        with pytest.raises(ConfigError, match=expected):
            check_before_queueing(lora_config(pictures, **changes), family_paths)
    check_before_queueing(lora_config(pictures), family_paths)  # the defaults pass


def test_chroma1_hd_shape_gives_the_family_params_and_the_lora_names():
    """Chroma1-HD's published transformer config (diffusers' defaults are that config)."""

    from trainers import families
    from trainers.chroma_lora import CHROMA_LAYOUT
    from trainers.flux_lora import slot_sizes
    from trainers.published_shapes import shape
    transformer = shape("chroma").build()
    count = sum(p.numel() for p in transformer.parameters())
    assert abs(count - families.get("chroma").params[0]) / count < 0.01  # 8.9 B
    targets = CHROMA_LAYOUT.denoiser_targets(transformer, conv=False)
    assert len(targets) == 19 * 12 + 38 * 5
    files = {t.name.split("@")[0] for t in targets}
    assert files == {f"lora_unet_double_blocks_{i}_{n}" for i in range(19) for n in DOUBLE} | {
        f"lora_unet_single_blocks_{i}_{n}" for i in range(38) for n in SINGLE}
    assert len(files) == 228
    fused = slot_sizes({t.name: transformer.get_submodule(t.path).out_features for t in targets})
    assert fused["lora_unet_single_blocks_37_linear1"] == (3072, 3072, 3072, 12288)
