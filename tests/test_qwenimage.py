"""Qwen-Image on its tiny demo: conditioning as QwenImagePipeline encodes it, the VAE as the
transformer sees it (one frame, normalised by latents_mean / latents_std), the transformer's
output as Danlu's flow-matching velocity (checked against the pipeline's own transformer call
and Euler step), LoRA trained from the CLI with previews, musubi-tuner's kohya-style files that
QwenImagePipeline loads, Compare, exact resume, what a Qwen-Image run refuses, a single
transformer file, and the real shape."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, repeat_with_interruption
from tests.flow_family_checks import danlu_network, family_pipeline, flow_lora_config
from tests.test_textual_inversion import module_digest
from trainers.configs import LoraConfig
from trainers.formats.lora import load_lora
from trainers.methods.lora import run
from trainers.models import load_model

QWEN = "tiny-demo-qwenimage"
LINEARS = ("attn_to_q", "attn_to_k", "attn_to_v", "attn_to_out_0", "attn_add_q_proj",
           "attn_add_k_proj", "attn_add_v_proj", "attn_to_add_out", "img_mlp_net_0_proj",
           "img_mlp_net_2", "txt_mlp_net_0_proj", "txt_mlp_net_2")


def lora_config(folder, model=QWEN, **changes):
    return flow_lora_config(folder, model, **{"output_name": "qlora", **changes})


qwen_pipeline = family_pipeline


def image(pipe, prompt="zxq cat"):
    return pipe(prompt=prompt, negative_prompt="", num_inference_steps=2, height=64, width=64,
                true_cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


def with_network(pipe, path, strength=1.0):
    from trainers.qwenimage_lora import QWENIMAGE_LAYOUT
    return danlu_network(pipe, path, QWENIMAGE_LAYOUT, strength)


def test_qwenimage_demo_is_a_qwenimage_model_and_encodes_captions_as_its_pipeline(family_paths):
    from trainers.conditioning import prompt_encoder
    from trainers.families import folder_family, guess_family
    from trainers.qwenimage_model import DROP, TEMPLATE
    model = load_model(family_paths, QWEN)
    assert model.family == "qwen_image"
    assert type(model.unet).__name__ == "QwenImageTransformer2DModel"
    assert type(model.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert folder_family(family_paths.cache / QWEN) == "qwen_image"
    assert guess_family(family_paths, QWEN) == "qwen_image"
    from webui import choices  # listed in every model dropdown as its family's demo
    assert (f"{QWEN} (built-in Qwen-Image demo, random weights)", QWEN) in \
        choices.model_choices(family_paths)
    pipe = qwen_pipeline(family_paths.cache / QWEN)
    assert (TEMPLATE, DROP) == (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    # the demo's tokenizer gives the template's system turn and user prompt 34 tokens, as the
    # real one does, so the pipeline's drop removes exactly them
    head = pipe.tokenizer.tokenize(TEMPLATE.split("{}")[0])
    assert len(head) == DROP and head[-3:] == ["<|im_start|>", "user", "Ċ"]
    captions = ["zxq cat, a photo of a cat on a table", "a dog"]
    encoded = prompt_encoder(model).encode(list(captions))
    theirs, mask = pipe.encode_prompt(list(captions), "cpu")
    assert encoded.context.shape == (2, 512, 32)
    ours = encoded.trimmed()
    assert [len(o) for o in ours] == mask.sum(dim=1).tolist() and len(ours[0]) > len(ours[1])
    for mine, pipelines, keep in zip(ours, theirs, mask.bool()):
        assert torch.allclose(mine, pipelines[keep], atol=1e-5)


def test_qwenimage_vae_view_is_the_pipelines_normalised_one_frame_latents(family_paths):
    from trainers.qwenimage_model import qwenimage_vae
    pipe = qwen_pipeline(family_paths.cache / QWEN)
    latents = qwenimage_vae(pipe.vae)
    assert qwenimage_vae(latents) is latents
    assert latents.config.scaling_factor == 1.0 and not latents.config.shift_factor
    assert 2 ** (len(latents.config.block_out_channels) - 1) == pipe.vae_scale_factor == 8
    pixels = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        dist = latents.encode(pixels).latent_dist
        assert dist.mean.shape == (1, 16, 8, 6)
        raw = pipe.vae.encode(pixels[:, :, None]).latent_dist.mean  # [1, 16, 1, 8, 6]
        assert torch.allclose(dist.mean, ((raw - mean) / std)[:, :, 0], atol=1e-5)
        # decoding takes it back as the pipeline does after its last step
        decoded = latents.decode(dist.mean).sample
        theirs = pipe.vae.decode(dist.mean[:, :, None] * std + mean).sample[:, :, 0]
        assert decoded.shape == (1, 3, 64, 48) and torch.allclose(decoded, theirs, atol=1e-5)
    assert not torch.allclose(mean, torch.zeros_like(mean))  # the real statistics show


def test_qwenimage_prediction_is_the_pipelines_transformer_call(family_paths):
    """For captions of different lengths the hook calls the transformer as the pipeline does
    (its padded states and mask, img_shapes, sigma), and one pipeline step from sigma to 0 is
    latents - sigma * v: the hook's output is v."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from trainers.conditioning import prompt_encoder, unet_inputs
    from trainers.qwenimage_model import pack, qwenimage_prediction
    model = load_model(family_paths, QWEN)
    pipe = qwen_pipeline(family_paths.cache / QWEN)
    latents = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(2))
    captions = ["zxq cat, a photo of a cat on a table", "a dog"]
    with torch.no_grad():
        context, added = unet_inputs(prompt_encoder(model).encode(captions), latents)
        theirs, mask = pipe.encode_prompt(captions, "cpu")
        sigma = torch.tensor([0.7, 0.3])
        called = pipe.transformer(hidden_states=pack(latents), timestep=sigma,
                                  encoder_hidden_states=theirs, encoder_hidden_states_mask=mask,
                                  img_shapes=[[(1, 4, 3)]] * 2, return_dict=False)[0]
        velocity = qwenimage_prediction(model.unet, latents, sigma * 1000, context, added,
                                        torch.float32)
    assert velocity.shape == latents.shape
    assert torch.allclose(pack(velocity), called, atol=1e-5)

    # one step of the pipeline (without the terminal stretch, so sigma stays large)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                 shift_terminal=None)
    one = latents[:1]
    stepped = pipe(prompt=captions[0], sigmas=[0.6], height=64, width=48, true_cfg_scale=1.0,
                   latents=pack(one), output_type="latent").images
    sigma = pipe.scheduler.sigmas[0]
    assert 0.6 < float(sigma) < 1.0  # the scheduler's shift moved it
    with torch.no_grad():
        one_context, one_added = unet_inputs(prompt_encoder(model).encode(captions[:1]), one)
        velocity = qwenimage_prediction(model.unet, one, (sigma * 1000).reshape(1), one_context,
                                        one_added, torch.float32)
    assert torch.allclose(pack(one - sigma * velocity), stepped, atol=1e-5)
    with pytest.raises(ValueError, match="2x2 patches"):
        qwenimage_prediction(model.unet, torch.randn(1, 16, 7, 8), torch.ones(1), one_context,
                             one_added, torch.float32)
    with pytest.raises(ValueError, match="4 channels; the transformer takes 16"):
        qwenimage_prediction(model.unet, torch.randn(1, 4, 8, 8), torch.ones(1), one_context,
                             one_added, torch.float32)


def test_qwenimage_lora_trains_from_the_cli_with_previews_and_diffusers_loads_it(
        family_paths, pictures, tmp_path, capsys):
    import shutil

    from trainers.__main__ import main
    model = load_model(family_paths, QWEN)
    digests = {n: module_digest(getattr(model, n)) for n in ("unet", "text_encoder", "vae")}
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{QWEN}"\noutput_name = "qlora"\ntrain_data_dir = "{pictures}"\n'
        'resolution = 64\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16\n'
        'network_dim = 4\nnetwork_alpha = 2.0\nmax_train_steps = 4\nsave_every_n_epochs = 0\n'
        'learning_rate = 5e-3\nseed = 3\nsave_precision = "fp32"\n'
        'network_train_unet_only = true\nsave_diffusers_format = true\n'
        'sample_every_n_steps = 2\nsample_prompts = "zxq cat --w 64 --h 64 --s 2 --l 2"\n')
    assert main(["lora", "--config", str(config), "--data-dir", str(family_paths.data_dir)]) == 0
    err = capsys.readouterr().err
    assert "finished at step 4" in err
    assert "Check (Qwen-Image): loads in ComfyUI / diffusers" in err  # their key maps
    path = family_paths.lora / "qlora.safetensors"
    previews = {p.name for p in family_paths.data_dir.rglob("images/qlora-*.png")}
    assert previews == {"qlora-0.png", "qlora-2.png", "qlora-4.png"}
    state, meta = load_lora(path)
    assert sorted({k.split(".")[0] for k in state}) == sorted(
        f"lora_unet_transformer_blocks_0_{n}" for n in LINEARS)
    assert state["lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"].shape == (4, 32)
    assert state["lora_unet_transformer_blocks_0_img_mlp_net_0_proj.lora_up.weight"].shape == (
        128, 4)
    assert float(state["lora_unet_transformer_blocks_0_attn_to_q.alpha"]) == pytest.approx(2.0)
    assert meta["ss_base_model_version"] == "qwen_image"
    assert meta["ss_network_module"] == "networks.lora_qwen_image"
    assert meta["modelspec.architecture"] == "Qwen-Image/lora"
    assert "modelspec.prediction_type" not in meta and meta["ss_steps"] == "4"
    assert {n: module_digest(getattr(model, n)) for n in digests} == digests

    pipe = qwen_pipeline(family_paths.cache / QWEN)
    base = image(pipe)
    network = with_network(pipe, path)
    ours = image(pipe)
    network.set_strength(0.0)
    assert np.array_equal(image(pipe), base)  # strength 0 is the base model exactly
    network.remove()
    assert not np.allclose(ours, base)
    pipe.load_lora_weights(str(path))
    adapted = [m for m in pipe.transformer.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(adapted) == 12
    assert np.allclose(image(pipe), ours, atol=1e-5)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(path.with_name("qlora-diffusers")))
    assert np.allclose(image(pipe), ours, atol=1e-5)
    shutil.rmtree(path.with_name("qlora-diffusers"))


def test_qwenimage_previews_use_true_cfg(family_paths):
    """The sample's CFG scale is the pipeline's true_cfg_scale with the negative prompt."""
    from trainers.conditioning import prompt_encoder
    from trainers.sampling import PreviewSettings, render
    model = load_model(family_paths, QWEN)
    encoder = prompt_encoder(model)
    settings = dict(prompt="zxq cat", negative="blurry", steps=2, width=64, height=64, seed=5,
                    sampler="Euler a")
    plain, _ = render(model, encoder, PreviewSettings(**settings, cfg=1.0))
    guided, _ = render(model, encoder, PreviewSettings(**settings, cfg=4.0))
    pipe = qwen_pipeline(family_paths.cache / QWEN)
    theirs = pipe(prompt="zxq cat", negative_prompt="blurry", true_cfg_scale=4.0,
                  num_inference_steps=2, height=64, width=64,
                  generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(guided), np.asarray(theirs))
    assert not np.array_equal(np.asarray(plain), np.asarray(guided))


def test_a_qwenimage_lora_run_is_compared_by_checkpoint_and_strength(family_paths, pictures,
                                                                     tmp_path):
    from PIL import Image

    from trainers import runs as rn
    from trainers.compare import render_grid, spec_for_run
    run(lora_config(pictures, save_every_n_steps=2, sample_at_first=False,
                    learning_rate=5e-2), RecordingContext(family_paths))
    lora = next(r for r in rn.scan_runs(family_paths) if r.method == "lora")
    spec = spec_for_run(lora, ["4-final", "2"], "0, 1", "zxq cat", "3", steps=2)
    grid = render_grid(spec, family_paths, cache_dir=tmp_path / "cells")
    assert grid.rendered == 4 and grid.row_labels[0] == "step 2 · strength 0"
    cells = {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / "cells").glob("*.png"))}
    assert len({c.tobytes() for c in cells.values()}) == 3  # strength 0 is the base both times


def test_qwenimage_lora_lowers_the_loss_on_its_batch_and_resumes_exactly(family_paths, pictures):
    import shutil

    from tests.conftest import photo
    from trainers.conditioning import prompt_encoder, unet_inputs
    from trainers.lora_network import LoraNetwork, LoraSpec
    from trainers.qwenimage_lora import QWENIMAGE_LAYOUT
    from trainers.qwenimage_model import qwenimage_prediction
    from trainers.step import diffusion_loss
    model = load_model(family_paths, QWEN)
    with torch.no_grad():
        latents = model.vae.encode(torch.from_numpy(
            np.asarray(photo(0, 64), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        ).latent_dist.mean
        context, added = unet_inputs(prompt_encoder(model).encode(["zxq cat"]), latents)

    def loss():
        with torch.no_grad():
            return float(sum(diffusion_loss(model.unet, model.objective(), latents, context,
                                            torch.Generator().manual_seed(k), added_cond=added,
                                            predict=qwenimage_prediction) for k in range(8)))
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
                     layout=QWENIMAGE_LAYOUT) as network:
        network.load_kohya_state_dict(state)
        assert loss() < before

    cfg = lora_config(pictures, output_name="resumed", max_train_steps=5,
                      lr_scheduler="cosine", train_batch_size=1)
    repeat_with_interruption(run, cfg, family_paths, load=lambda p: load_lora(p)[0],
                             reset=lambda: (family_paths.lora / "resumed.safetensors").unlink())


def test_qwenimage_runs_refuse_what_does_not_apply(family_paths, pictures):
    from trainers.configs import TextualInversionConfig
    from trainers.preflight import check_before_queueing
    for changes, expected in [
            ({"network_train_unet_only": False}, "Qwen-Image has no text-encoder LoRA"),
            ({"conv_dim": 4}, "conv_dim"), ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
            ({"mixed_precision": "fp16"}, "mixed_precision: Qwen-Image is a bf16 model"),
            ({"train_double_block_indices": "0"}, "train_double_block_indices: Qwen-Image"),
            ({"resolution": 72}, "resolution: Qwen-Image needs a multiple of 16")]:
        with pytest.raises(ConfigError, match=expected):
            check_before_queueing(lora_config(pictures, **changes), family_paths)
    check_before_queueing(lora_config(pictures), family_paths)  # the defaults pass
    ti = TextualInversionConfig(model=QWEN, embedding="x", data_root=str(pictures))
    with pytest.raises(ConfigError, match="tiny-demo-qwenimage is a Qwen-Image model"):
        check_before_queueing(ti, family_paths)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_qwenimage_transformer_file_loads_with_the_demos_parts(tmp_path, prefix):
    """A single transformer file as ComfyUI ships Qwen-Image (diffusers' names, with or without
    its prefix) is told apart and loads with a matching folder's text encoder and VAE (here the
    demo's); a file with a foreign tensor is refused by name."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from core.paths import Paths
    from trainers.families import guess_family
    from trainers.models import ModelError
    from trainers.tiny_model import build_tiny_model
    paths = Paths(tmp_path / "data").ensure()
    folder = build_tiny_model(paths.cache / QWEN, family="qwen_image")
    transformer = DiffusionPipeline.from_pretrained(folder).transformer
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(0.01)
    state = {prefix + k: v.contiguous() for k, v in transformer.state_dict().items()}
    save_file(state, str(paths.stable_diffusion / "qwen-ft.safetensors"))
    assert guess_family(paths, "qwen-ft.safetensors") == "qwen_image"
    model = load_model(paths, "qwen-ft.safetensors")
    assert model.family == "qwen_image" and model.short_hash and not model.is_demo
    loaded = model.unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in transformer.state_dict().items())
    assert type(model.vae).__name__ == "QwenImageLatents" and model.text_encoder is not None
    save_file({**state, prefix + "extra.weight": torch.zeros(2)},
              str(paths.stable_diffusion / "qwen-odd.safetensors"))
    with pytest.raises(ModelError, match="qwen-odd.safetensors holds only a Qwen-Image"):
        load_model(paths, "qwen-odd.safetensors")


def test_qwen_image_shape_gives_the_family_params_and_musubis_lora_names():
    """Qwen/Qwen-Image's published configs (transformer, VAE, Qwen2.5-VL-7B), built on the
    meta device."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from trainers import families
    from trainers.memory_estimate import estimate
    from trainers.qwenimage_lora import QWENIMAGE_LAYOUT
    from trainers.published_shapes import shape
    transformer = shape("qwen_image").build()
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage()
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                              "mrope_section": [16, 24, 24]}),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                               out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31])))
    params = families.get("qwen_image").params
    for part, expected in zip((transformer, text_encoder, vae), params):
        count = sum(p.numel() for p in part.parameters())
        assert abs(count - expected) / count < 0.01  # 20.4 B, 8.3 B, 127 M
    targets = QWENIMAGE_LAYOUT.denoiser_targets(transformer, conv=False)
    assert len(targets) == 60 * 12
    assert {t.name for t in targets} == {f"lora_unet_transformer_blocks_{i}_{n}"
                                         for i in range(60) for n in LINEARS}
    # every name is what diffusers' Qwen converter turns back into the module path, and what
    # ComfyUI's generic map makes of the module's state-dict key
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_qwen_lora_to_diffusers)
    state = {f"{t.name}.{kind}.weight": torch.zeros(1) for t in targets
             for kind in ("lora_down", "lora_up")}
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(state)
    assert {k.removesuffix(".lora_A.weight") for k in converted if "lora_A" in k} == {
        f"transformer.{t.path}" for t in targets}
    assert all(t.name == "lora_unet_" + t.path.replace(".", "_") for t in targets)
    # a rank-16 LoRA on all of them: ~106 M parameters (a ~212 MB bf16 file)
    trainable = sum(16 * (m.in_features + m.out_features)
                    for m in (transformer.get_submodule(t.path) for t in targets))
    assert 100e6 < trainable < 110e6
    cfg = LoraConfig(model="qwen-image", train_data_dir="x", resolution=1024, network_dim=16,
                     mixed_precision="bf16", gradient_checkpointing=True)
    report = estimate(cfg, "qwen_image")
    # the VAE waits off the device: the latents are cached
    assert report.parts["weights"] == pytest.approx(2 * (20.43e9 + 8.29e9))
    assert report.total > 48e9  # bf16 weights alone: a 24 GB card needs fp8 and offloading
