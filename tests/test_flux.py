"""Flux.1 on its tiny demo: conditioning and packing as FluxPipeline does them, LoRA trained
through the shared step with the flow-matching objective, files in kohya's Flux names that
diffusers' FluxPipeline loads, previews, exact resume, and what a Flux run refuses."""
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

FLUX = "tiny-demo-flux"


def lora_config(folder, model=FLUX, **changes):
    return flow_lora_config(folder, model, **{"output_name": "fluxlora", **changes})


flux_pipeline = family_pipeline


def image(pipe, prompt="zxq cat"):
    return pipe(prompt, num_inference_steps=2, height=64, width=64, guidance_scale=3.5,
                max_sequence_length=512, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


def with_network(pipe, path, strength=1.0):
    from trainers.flux_lora import FLUX_LAYOUT
    return danlu_network(pipe, path, FLUX_LAYOUT, strength, fit=True)


def test_flux_demo_is_a_flux_model_and_encodes_captions_as_its_pipeline(family_paths):
    from trainers.conditioning import prompt_encoder
    from trainers.families import folder_family, guess_family
    model = load_model(family_paths, FLUX)
    assert model.family == "flux1" and type(model.unet).__name__ == "FluxTransformer2DModel"
    assert folder_family(family_paths.cache / FLUX) == "flux1"
    assert guess_family(family_paths, FLUX) == "flux1"
    encoded = prompt_encoder(model).encode(["zxq cat, a photo", "a dog"])
    pipe = flux_pipeline(family_paths.cache / FLUX)
    context, pooled, _ids = pipe.encode_prompt(["zxq cat, a photo", "a dog"], None,
                                               max_sequence_length=512)
    assert torch.allclose(encoded.context, context, atol=1e-4)
    assert torch.allclose(encoded.pooled, pooled, atol=1e-6)


def test_flux_prediction_packs_latents_as_the_pipeline_does(family_paths):
    from diffusers import FluxPipeline
    from trainers.flux_model import flux_prediction, image_ids, pack, unpack
    latents = torch.randn(2, 16, 8, 12)
    assert torch.equal(pack(latents), FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(unpack(pack(latents), 8, 12), latents)
    assert torch.equal(image_ids(8, 12, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))
    model = load_model(family_paths, FLUX)
    context, pooled = torch.randn(2, 7, 48), torch.randn(2, 32)
    sigmas = torch.tensor([0.25, 0.75])
    ours = flux_prediction(model.unet, latents, sigmas * 1000, context,
                           {"pooled_projections": pooled, "guidance": torch.full((2,), 2.0)},
                           torch.float32)
    with torch.no_grad():
        theirs = model.unet(hidden_states=pack(latents), encoder_hidden_states=context,
                            pooled_projections=pooled, timestep=sigmas,
                            guidance=torch.full((2,), 2.0), img_ids=image_ids(8, 12, "cpu", torch.float32),
                            txt_ids=torch.zeros(7, 3), return_dict=False)[0]
    assert torch.allclose(ours, unpack(theirs, 8, 12))
    with pytest.raises(ValueError, match="2x2 patches"):
        flux_prediction(model.unet, torch.randn(1, 16, 7, 8), sigmas[:1], context[:1],
                        {"pooled_projections": pooled[:1]}, torch.float32)


def test_flux_lora_trains_previews_and_saves_kohya_flux_names(family_paths, pictures):
    model = load_model(family_paths, FLUX)
    digests = {n: module_digest(getattr(model, n))
               for n in ("unet", "text_encoder", "text_encoder_2", "vae")}
    ctx = RecordingContext(family_paths)
    path = run(lora_config(pictures, sample_every_n_steps=2, save_diffusers_format=True,
                           sample_prompts="zxq cat --w 64 --h 64 --s 2"), ctx)
    assert [p.step for p in ctx.of(Preview)] == [0, 2, 4]  # sample_at_first by default
    state, meta = load_lora(path)
    names = sorted({k.split(".")[0] for k in state})
    assert names == sorted(
        [f"lora_unet_double_blocks_0_{n}" for n in (
            "img_attn_proj", "img_attn_qkv", "img_mlp_0", "img_mlp_2", "img_mod_lin",
            "txt_attn_proj", "txt_attn_qkv", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")]
        + [f"lora_unet_single_blocks_0_{n}" for n in ("linear1", "linear2", "modulation_lin")])
    # q, k, v side by side in the fused layer: rank 3 x 4, alpha scaled to keep alpha / rank
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (96, 12)
    assert float(state["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == pytest.approx(6.0)
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 128, 16)
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert "modelspec.prediction_type" not in meta and meta["ss_steps"] == "4"
    # training left every base module as it was
    assert {n: module_digest(getattr(model, n)) for n in digests} == digests

    # the diffusers (peft) folder loads in FluxPipeline and gives what Danlu's network gives
    pipe = flux_pipeline(family_paths.cache / FLUX)
    base = image(pipe)
    network = with_network(pipe, path)
    ours = image(pipe)
    network.set_strength(0.0)
    assert np.array_equal(image(pipe), base)  # strength 0 is the base model exactly
    network.remove()
    assert not np.allclose(ours, base)
    pipe.load_lora_weights(str(path.with_name("fluxlora-diffusers")))
    assert np.allclose(image(pipe), ours, atol=1e-5)


def _double_block_only_demo(family_paths) -> str:
    """The demo with its single-stream block removed: diffusers' kohya Flux converter splits
    single blocks' linear1 at Flux.1's real widths (3072 / 12288) only, so a tiny model with
    single blocks cannot load a kohya file there (the real widths are checked in
    tests/test_flux_lora_keys.py)."""
    from diffusers import FluxTransformer2DModel
    source = family_paths.cache / FLUX
    target = family_paths.stable_diffusion / "flux-double-only"
    shutil.copytree(source, target)
    config = dict(FluxTransformer2DModel.load_config(source / "transformer"))
    config["num_single_layers"] = 0
    torch.manual_seed(0)
    FluxTransformer2DModel.from_config(config).save_pretrained(target / "transformer")
    return target.name


def test_kohya_flux_file_with_text_encoder_loads_in_diffusers_like_danlus_network(
        family_paths, pictures):
    name = _double_block_only_demo(family_paths)
    path = run(lora_config(pictures, model=name, output_name="withte",
                           network_train_unet_only=False), RecordingContext(family_paths))
    state, _ = load_lora(path)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in state)
    assert not any(k.startswith(("lora_te2", "lora_te3", "lora_te_")) for k in state)  # T5 frozen
    folder = family_paths.stable_diffusion / name
    pipe = flux_pipeline(folder)
    base = image(pipe)
    network = with_network(pipe, path)
    ours = image(pipe)
    network.remove()
    pipe.load_lora_weights(str(path))
    adapted = [m for m in pipe.transformer.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(adapted) == 14  # every Linear of the double block, q/k/v split again
    loaded = image(pipe)
    assert not np.allclose(loaded, base)
    assert np.allclose(loaded, ours, atol=1e-4)


def test_flux_lora_lowers_the_loss_on_its_batch_and_resumes_exactly(family_paths, pictures):
    from trainers.conditioning import prompt_encoder, unet_inputs
    from trainers.flux_model import flux_prediction
    from trainers.step import diffusion_loss
    model = load_model(family_paths, FLUX)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        context, added = unet_inputs(prompt_encoder(model).encode(["zxq cat"]), latents)

    def loss():
        with torch.no_grad():
            return float(sum(diffusion_loss(model.unet, model.objective(), latents, context,
                                            torch.Generator().manual_seed(k), added_cond=added,
                                            predict=flux_prediction) for k in range(8)))
    before = loss()
    shutil.rmtree(pictures / "2_zxq cat")
    one = pictures / "2_zxq cat"
    one.mkdir()
    from tests.conftest import photo
    photo(0, 64).save(one / "a.png")
    (one / "a.txt").write_text("zxq cat")
    path = run(lora_config(pictures, max_train_steps=30, learning_rate=2e-2),
               RecordingContext(family_paths))
    from trainers.flux_lora import FLUX_LAYOUT
    from trainers.lora_network import LoraNetwork
    from trainers.checkpoint_apply import spec_from_state
    state, _ = load_lora(path)
    with LoraNetwork(model.unet, None, spec_from_state(state), layout=FLUX_LAYOUT) as network:
        network.load_kohya_state_dict(state)
        assert loss() < before

    cfg = lora_config(pictures, output_name="resumed", max_train_steps=5,
                      lr_scheduler="cosine", train_batch_size=1)
    repeat_with_interruption(run, cfg, family_paths, load=lambda p: load_lora(p)[0],
                             reset=lambda: (family_paths.lora / "resumed.safetensors").unlink())


def test_flux_runs_refuse_what_does_not_apply_and_sd_runs_refuse_flux_options(
        family_paths, pictures):
    from trainers.configs import TextualInversionConfig
    from trainers.preflight import check_before_queueing
    for changes, field in [({"conv_dim": 4}, "conv_dim"), ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
                           ({"resolution": 72}, "resolution"),
                           ({"mixed_precision": "fp16"}, "mixed_precision: Flux.1 is a bf16 model")]:
        with pytest.raises(ConfigError, match=field):
            check_before_queueing(lora_config(pictures, **changes), family_paths)
    with pytest.raises(ConfigError, match="timestep_sampling: applies to flow-matching models"):
        check_before_queueing(lora_config(pictures, model="tiny-demo",
                                          timestep_sampling="sigmoid"), family_paths)
    check_before_queueing(lora_config(pictures), family_paths)  # the defaults pass
    ti = TextualInversionConfig(model=FLUX, embedding="x", data_root=str(pictures))
    with pytest.raises(ConfigError, match="Flux.1 model"):
        check_before_queueing(ti, family_paths)


def test_an_incomplete_original_layout_flux_file_is_refused_by_name(family_paths):
    """A file with Flux.1's own keys is told apart (with or without ComfyUI's prefix); one that
    lacks the rest of the transformer is refused saying what it lacks (whole files load:
    tests/test_transformer_files.py)."""
    import safetensors.torch
    from trainers.families import file_family
    from trainers.models import ModelError
    for prefix in ("", "model.diffusion_model."):
        path = family_paths.stable_diffusion / f"flux1-{len(prefix)}.safetensors"
        safetensors.torch.save_file({f"{prefix}double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
                                     f"{prefix}vector_in.in_layer.weight": torch.zeros(2, 2)},
                                    str(path))
        assert file_family(path) == "flux1"
        with pytest.raises(ModelError, match=f"{path.name} is not a Flux.1 transformer.*img_in"):
            load_model(family_paths, path.name)


def test_a_flux_lora_run_is_compared_by_checkpoint_and_strength(family_paths, pictures, tmp_path):
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


def test_flux_lora_trains_only_the_chosen_blocks_and_compare_rebuilds_them(family_paths, pictures):
    import json
    from trainers.checkpoint_apply import lora as apply_lora
    from trainers.configs import block_indices
    from trainers.preflight import check_before_queueing
    path = run(lora_config(pictures, train_single_block_indices="none", output_name="doubles"),
               RecordingContext(family_paths))
    state, meta = load_lora(path)
    assert {k.split(".")[0] for k in state} == {
        f"lora_unet_double_blocks_0_{n}" for n in (
            "img_attn_proj", "img_attn_qkv", "img_mlp_0", "img_mlp_2", "img_mod_lin",
            "txt_attn_proj", "txt_attn_qkv", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")}
    assert json.loads(meta["ss_network_args"])["train_single_block_indices"] == "none"
    model = load_model(family_paths, FLUX)
    from types import SimpleNamespace
    with apply_lora(SimpleNamespace(clip_skip=1), family_paths, model, path, []) as (_, strength, _):
        strength(1.0)  # the Compare grid builds a network that fits the file
    assert block_indices("0-2,5", 8) == [0, 1, 2, 5] and block_indices("all", 3) == [0, 1, 2]
    for text, words in [("2-1", "runs backwards"), ("x", "not an index"),
                        ("7", "past the model's 1 blocks")]:
        with pytest.raises((ValueError, ConfigError), match=words):
            run(lora_config(pictures, train_double_block_indices=text), RecordingContext(family_paths))
    with pytest.raises(ConfigError, match="train_double_block_indices: SD 1.x has no double"):
        check_before_queueing(lora_config(pictures, model="tiny-demo",
                                          train_double_block_indices="0"), family_paths)


def test_a_rank_per_layer_type_is_trained_saved_and_loaded(family_paths, pictures):
    """kohya's type_dims: each kind of layer at its own rank (and alpha), 0 leaving it out; the
    file says so in ss_network_args, diffusers loads it as Danlu's network applies it, and the
    same settings continue from the file; bad types and values are refused by name."""
    import json
    from trainers.preflight import check_before_queueing
    name = _double_block_only_demo(family_paths)
    path = run(lora_config(pictures, model=name, output_name="typed",
                           type_dims="img_attn=8/4, txt_mod=0, txt_mlp_dim=2"),
               RecordingContext(family_paths))
    state, meta = load_lora(path)
    prefix = "lora_unet_double_blocks_0_"
    assert state[prefix + "img_attn_proj.lora_down.weight"].shape[0] == 8
    assert float(state[prefix + "img_attn_proj.alpha"]) == 4.0
    assert state[prefix + "txt_mlp_0.lora_down.weight"].shape[0] == 2
    assert float(state[prefix + "txt_mlp_0.alpha"]) == 2.0  # the network alpha
    assert state[prefix + "txt_attn_proj.lora_down.weight"].shape[0] == 4  # not named: network_dim
    assert not any(k.startswith(prefix + "txt_mod_lin") for k in state)
    args = json.loads(meta["ss_network_args"])
    assert (args["img_attn_dim"], args["img_attn_alpha"], args["txt_mod_dim"]) == ("8", "4", "0")
    pipe = flux_pipeline(family_paths.stable_diffusion / name)
    base = image(pipe)
    network = with_network(pipe, path)
    ours = image(pipe)
    network.remove()
    pipe.load_lora_weights(str(path))
    loaded = image(pipe)
    assert not np.allclose(loaded, base) and np.allclose(loaded, ours, atol=1e-4)
    from core.events import Progress
    ctx = RecordingContext(family_paths)
    again = run(lora_config(pictures, model=name, output_name="typed", max_train_steps=6,
                            type_dims="img_attn=8/4, txt_mod=0, txt_mlp_dim=2"), ctx)
    steps = [e.step for e in ctx.events if isinstance(e, Progress)]
    assert steps[0] == 5 and load_lora(again)[1]["ss_steps"] == "6"  # continued from the file
    for text, words in [("img_attn=-1", "rank of 0 or more"), ("img_attn", "name=rank"),
                        ("img_attn=2, img_attn=3", "given twice")]:
        with pytest.raises(ConfigError, match=f"type_dims: .*{words}"):
            lora_config(pictures, type_dims=text)
    with pytest.raises(ConfigError, match="type_dims: Flux.1 has no cross_attn layers"):
        check_before_queueing(lora_config(pictures, type_dims="cross_attn=4"), family_paths)
    with pytest.raises(ConfigError, match="type_dims: SD 1.x has no img_attn layers"):
        check_before_queueing(lora_config(pictures, model="tiny-demo", type_dims="img_attn=4"),
                              family_paths)
