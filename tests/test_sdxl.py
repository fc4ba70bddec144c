"""SDXL on the tiny SDXL-shaped model: two text encoders, size/crop conditioning in the shared
step, kohya LoRA (lora_te1_/lora_te2_, original-layout U-Net names, SDXL metadata) that diffusers'
StableDiffusionXLPipeline loads and that changes its output; previews with the SDXL pipeline."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from core.events import Preview
from tests.conftest import RecordingContext
from trainers.models import load_model

SDXL = "tiny-demo-sdxl"
KOHYA = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


def sdxl_pipeline(folder):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, prompt="zxq cat"):
    return pipe(prompt, num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_sdxl_prompt_encoding_matches_diffusers(family_paths):
    """Our context (both encoders' penultimate states) and pooled projection are what the SDXL
    pipeline computes from the same prompt."""
    from trainers.conditioning import SdxlCondition, prompt_encoder
    model = load_model(family_paths, SDXL)
    encoded = prompt_encoder(model).encode(["a photo of a zxq cat"])
    assert isinstance(encoded, SdxlCondition)
    pipe = sdxl_pipeline(family_paths.cache / SDXL)
    context, _, pooled, _ = pipe.encode_prompt("a photo of a zxq cat", do_classifier_free_guidance=False)
    assert encoded.context.shape == (1, 77, 80) and encoded.pooled.shape == (1, 48)
    assert torch.allclose(encoded.context, context, atol=1e-5)
    assert torch.allclose(encoded.pooled, pooled, atol=1e-5)


def test_size_and_crop_conditioning_reaches_the_unet(family_paths, pictures):
    from trainers.conditioning import time_ids, unet_inputs
    from trainers.kohya_data import folder_dataset, prepare_datasets
    from trainers.step import diffusion_loss
    from trainers.conditioning import prompt_encoder
    model = load_model(family_paths, SDXL)
    batches = prepare_datasets(folder_dataset(pictures, **KOHYA), model.vae)
    sizes = {tuple(map(tuple, batches.batch(m).sizes[0])) for m in range(batches.batches_per_epoch)}
    originals = {s[0] for s in sizes}
    assert originals == {(64, 64), (64, 96), (96, 64)}  # (height, width) of each photo
    assert all(s[2] == (64, 64) or s[2] != s[0] for s in sizes)
    batch = batches.batch(0)
    ids = time_ids(batch.sizes, batch.latents)
    assert ids.shape == (1, 6) and ids[0, :2].tolist() == list(batch.sizes[0][0])
    assert time_ids(None, torch.zeros(2, 4, 8, 12)).tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    context, added = unet_inputs(prompt_encoder(model).encode(batch.texts), batch.latents, batch.sizes)
    losses = []
    for ids in ([[64, 64, 0, 0, 64, 64]], [[1024, 512, 100, 0, 64, 64]]):
        with torch.no_grad():
            losses.append(diffusion_loss(model.unet, model.objective(), batch.latents, context,
                                         torch.Generator().manual_seed(1),
                                         added_cond={**added, "time_ids": torch.tensor(ids, dtype=torch.float32)}).item())
    assert losses[0] != losses[1]


def lora_config(folder, **changes):
    from trainers.configs import LoraConfig
    base = dict(model=SDXL, output_name="xl", train_data_dir=str(folder), network_dim=4,
                network_alpha=2.0, max_train_steps=3, save_every_n_epochs=0, sample_at_first=False,
                learning_rate=1e-2, seed=7, save_precision="fp32", **KOHYA)
    base.update(changes)
    return LoraConfig(**base).validate()


def test_sdxl_lora_file_keys_metadata_and_diffusers_loading(family_paths, pictures):
    from trainers.formats.lora import load_lora
    from trainers.lora_network import lora_names, merge_into
    from trainers.methods.lora import run
    ctx = RecordingContext(family_paths)
    path = run(lora_config(pictures, sample_every_n_steps=3,
                           sample_prompts="zxq cat --w 64 --h 64 --s 2"), ctx)
    assert [p.step for p in ctx.of(Preview)] == [3]
    state, meta = load_lora(path)
    names = lora_names(state)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_v2"] == "False"
    prefixes = {re.match(r"lora_(unet_[a-z]+_blocks?|te\d?)_", n).group(1) for n in names}
    assert prefixes == {"unet_input_blocks", "unet_middle_block", "unet_output_blocks", "te1", "te2"}
    # kohya's SDXL names: diffusers' down_blocks.1.attentions.0 is input_blocks.3.1 with one
    # layer per block (input_blocks.4.1 with SDXL's two)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    assert not any("down_blocks" in n or "text_projection" in n for n in names)

    pipe = sdxl_pipeline(family_paths.cache / SDXL)
    base = image(pipe)
    merged = sdxl_pipeline(family_paths.cache / SDXL)
    merge_into(merged.unet, merged.text_encoder, state, text_encoder_2=merged.text_encoder_2)
    pipe.load_lora_weights(str(path))
    adapted = [m for m in pipe.unet.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(adapted) == sum(n.startswith("lora_unet_") for n in names)  # every key found
    loaded = image(pipe)
    assert not np.allclose(base, loaded)
    # diffusers' loader maps each kohya name to the same module we trained
    assert np.allclose(loaded, image(merged), atol=1e-4)


def test_sdxl_lora_unet_only_with_cached_text_encoder_outputs(family_paths, pictures):
    from trainers.formats.lora import load_lora
    from trainers.methods.lora import run
    model = load_model(family_paths, SDXL)
    te2 = copy.deepcopy(model.text_encoder_2.state_dict())
    path = run(lora_config(pictures, output_name="xl-unet", network_train_unet_only=True,
                           cache_text_encoder_outputs=True, gradient_checkpointing=True),
               RecordingContext(family_paths))
    state, _ = load_lora(path)
    assert all(k.startswith("lora_unet_") for k in state)
    assert all(torch.equal(v, model.text_encoder_2.state_dict()[k]) for k, v in te2.items())


def test_full_size_sdxl_unet_gets_kohyas_722_lora_modules():
    """On the shipped SDXL config (meta device): the module count and names kohya's
    sdxl_train_network creates for the U-Net."""
    import json
    from pathlib import Path
    from diffusers import UNet2DConditionModel
    from trainers.lora_network import find_targets
    config = Path(__file__).resolve().parent.parent / "trainers/model_configs/sdxl/unet/config.json"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(config.read_text()))
    names = [t.name for t in find_targets(unet, "unet", conv=False)]
    assert len(names) == 722
    assert names[0] == "lora_unet_input_blocks_4_1_proj_in"
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj" in names
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0" in names


def test_sdxl_textual_inversion_trains_both_halves_and_loads_in_diffusers(family_paths, pictures):
    from safetensors.torch import load_file
    from trainers.configs import CreateEmbeddingConfig, TextualInversionConfig
    from trainers.embeddings import create_embedding
    from trainers.formats.embedding import load_embedding
    from trainers.loop import TrainingError
    from trainers.methods.textual_inversion import run
    path = create_embedding(CreateEmbeddingConfig(name="zxqtok", init_text="cat", vectors_per_token=2,
                                                  model=SDXL, file_format="safetensors").validate(),
                            family_paths)
    before = load_embedding(path).vectors
    assert {k: tuple(v.shape) for k, v in before.items()} == {"clip_l": (2, 32), "clip_g": (2, 48)}
    cfg = TextualInversionConfig(model=SDXL, embedding="zxqtok", data_root=str(pictures / "2_zxq cat"),
                                 width=64, height=64, steps=3, save_every=0, preview_every=3,
                                 preview_steps=2, template="subject_filewords.txt",
                                 learn_rate="0.05", seed=3).validate()
    ctx = RecordingContext(family_paths)
    run(cfg, ctx)
    assert [p.step for p in ctx.of(Preview)] == [3]
    after = load_embedding(path)
    assert after.step == 3
    assert all(not torch.equal(after.vectors[k], before[k]) for k in ("clip_l", "clip_g"))
    # as A1111 and kohya save it, and as diffusers' docs load an SDXL embedding
    state = load_file(str(path))
    assert set(state) == {"clip_l", "clip_g"}
    pipe = sdxl_pipeline(family_paths.cache / SDXL)
    base = image(pipe, "a photo of zxqtok")
    pipe.load_textual_inversion(state["clip_g"], token="zxqtok", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state["clip_l"], token="zxqtok", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    assert not np.allclose(base, image(pipe, "a photo of zxqtok"))
    # a single-encoder (SD1/SD2) embedding is refused on SDXL, naming the mismatch
    create_embedding(CreateEmbeddingConfig(name="sd1tok", init_text="cat", vectors_per_token=1,
                                           model="tiny-demo").validate(), family_paths)
    with pytest.raises(TrainingError, match="sd1tok.*SDXL"):
        run(TextualInversionConfig(**{**cfg.__dict__, "embedding": "sd1tok"}).validate(),
            RecordingContext(family_paths))


def test_sdxl_dreambooth_writes_an_sdxl_single_file(family_paths, pictures):
    from diffusers import StableDiffusionXLPipeline
    from trainers.configs import DreamBoothConfig
    from trainers.families import file_family
    from trainers.methods.dreambooth import run
    base = load_model(family_paths, SDXL)
    te2 = copy.deepcopy(base.text_encoder_2.state_dict())
    path = run(DreamBoothConfig(model=SDXL, output_name="dbxl", train_data_dir=str(pictures),
                                instance_prompt="a photo of zxq cat", max_train_steps=2,
                                learning_rate=1e-3, sample_at_first=False, save_precision="fp32",
                                seed=3, train_text_encoder=True, gradient_checkpointing=True,
                                **KOHYA).validate(), RecordingContext(family_paths))
    assert file_family(path) == "sdxl"
    tuned = load_model(family_paths, path.name)
    assert tuned.family == "sdxl"
    assert any(not torch.equal(v, tuned.text_encoder_2.state_dict()[k]) for k, v in te2.items())
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(family_paths.cache / SDXL), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert not np.allclose(image(sdxl_pipeline(family_paths.cache / SDXL)), image(loaded))


def test_hypernetwork_sizes_follow_the_model(family_paths):
    """The sizes Create hypernetwork offers are the attention widths of the built models (text
    context first), and the real families' from their shipped U-Net configs."""
    import json
    from pathlib import Path
    from trainers.hypernetwork_attention import attention_widths
    from trainers import families
    from trainers.hypernetwork_sizes import model_sizes, unet_config_sizes
    for name in ("tiny-demo", "tiny-demo-sd2", SDXL):
        sizes = model_sizes(family_paths, name)
        model = load_model(family_paths, name)
        assert set(sizes) == attention_widths(model.unet)
        assert sizes[0] == model.unet.config.cross_attention_dim
    configs = Path(__file__).resolve().parent.parent / "trainers/model_configs"
    from trainers import catalog
    for family in families.all_families():
        if family.name not in catalog.get("hypernetwork").families:
            continue  # Flux.1 has no U-Net cross-attention to put hypernetworks on
        config = json.loads((configs / family.name / "unet/config.json").read_text())
        assert unet_config_sizes(config) == list(family.hypernetwork_sizes)
    assert families.get("sdxl").hypernetwork_sizes == (2048, 640, 1280)
    assert model_sizes(family_paths, "missing.ckpt") is None


def test_sdxl_hypernetwork_trains_previews_with_the_sdxl_pipeline_and_changes_the_output(
        family_paths, pictures, monkeypatch):
    from diffusers import StableDiffusionXLPipeline
    from trainers.configs import CreateHypernetworkConfig, HypernetworkTrainingConfig
    from trainers.formats.hypernetwork import load_hypernetwork
    from trainers.hypernetwork_sizes import model_sizes
    from trainers.hypernetworks import create_hypernetwork
    from trainers.loop import TrainingError
    from trainers.methods.hypernetwork import render_with, run
    from trainers.sampling import PreviewSettings
    calls = []
    original = StableDiffusionXLPipeline.__call__
    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    sizes = model_sizes(family_paths, SDXL)  # 80 = 32 + 48, the tiny SDXL's 2048; 64 a block width
    path = create_hypernetwork(CreateHypernetworkConfig(name="hnxl", sizes=sizes, model=SDXL,
                                                        layer_structure="1, 2, 1").validate(),
                               family_paths)
    before = [p.detach().clone() for p in load_hypernetwork(path).parameters()]
    cfg = HypernetworkTrainingConfig(model=SDXL, hypernetwork="hnxl", data_root=str(pictures / "2_zxq cat"),
                                     width=64, height=64, steps=3, save_every=0, preview_every=3,
                                     preview_steps=2, learn_rate="0.01", seed=5).validate()
    ctx = RecordingContext(family_paths)
    run(cfg, ctx)
    assert [p.step for p in ctx.of(Preview)] == [3] and calls  # previewed through the SDXL pipeline
    net = load_hypernetwork(path)
    assert net.step == 3 and sorted(net.layers) == [64, 80]
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()) if a.dim() == 2)
    model = load_model(family_paths, SDXL)
    settings = PreviewSettings(prompt="zxq cat", steps=2, width=64, height=64, seed=1)
    with_net = np.asarray(render_with(model, net, 1.0, settings)[0], dtype=float)
    without = np.asarray(render_with(model, net, 0.0, settings)[0], dtype=float)
    assert np.abs(with_net - without).max() > 0
    # an SD1-width hypernetwork is refused on SDXL, naming the widths
    with pytest.raises(Exception, match="80"):
        create_hypernetwork(CreateHypernetworkConfig(name="hn768", sizes=[768, 320], model=SDXL)
                            .validate(), family_paths)
    create_hypernetwork(CreateHypernetworkConfig(name="hn32", sizes=[32]).validate(), family_paths)
    with pytest.raises(TrainingError, match="hn32.*80"):
        run(HypernetworkTrainingConfig(**{**cfg.__dict__, "hypernetwork": "hn32"}).validate(),
            RecordingContext(family_paths))


def test_lora_extracted_from_an_sdxl_dreambooth_run_loads_and_approximates_it(family_paths, pictures):
    """Both text encoders and the U-Net, kohya's SDXL names and metadata; diffusers' SDXL
    pipeline loads it and moves toward the fine-tuned output."""
    from diffusers import StableDiffusionXLPipeline
    from trainers.configs import DreamBoothConfig, ExtractLoraConfig
    from trainers.extract_lora import run as extract
    from trainers.formats.lora import load_lora
    from trainers.lora_network import lora_names
    from trainers.methods.dreambooth import run
    run(DreamBoothConfig(model=SDXL, output_name="dbx", train_data_dir=str(pictures),
                         instance_prompt="a photo of zxq cat", max_train_steps=4, learning_rate=3e-3,
                         sample_at_first=False, save_precision="fp32", seed=3,
                         train_text_encoder=True, **KOHYA).validate(), RecordingContext(family_paths))
    path = extract(ExtractLoraConfig(checkpoint="dbx.safetensors", model=SDXL, output_name="fromdbx",
                                     rank=64, conv_rank=64, save_precision="fp32").validate(),
                   RecordingContext(family_paths))
    state, meta = load_lora(path)
    names = lora_names(state)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "1024x1024"
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in names
    assert not any("down_blocks" in n or "text_projection" in n for n in names)

    def picture(pipe):
        return image(pipe, "a photo of zxq cat")
    base = sdxl_pipeline(family_paths.cache / SDXL)
    tuned = StableDiffusionXLPipeline.from_single_file(
        str(family_paths.stable_diffusion / "dbx.safetensors"), config=str(family_paths.cache / SDXL),
        local_files_only=True)
    tuned.set_progress_bar_config(disable=True)
    base_image, tuned_image = picture(base), picture(tuned)
    base.load_lora_weights(str(path))
    adapted = [m for m in base.unet.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(adapted) == sum(n.startswith("lora_unet_") for n in names)  # every U-Net key found
    for encoder, prefix in ((base.text_encoder, "lora_te1_"), (base.text_encoder_2, "lora_te2_")):
        found = [m for m in encoder.modules() if hasattr(m, "lora_A") and m.lora_A]
        assert len(found) == sum(n.startswith(prefix) for n in names)
    with_lora = picture(base)
    assert np.abs(with_lora - tuned_image).mean() < 0.5 * np.abs(base_image - tuned_image).mean()


def test_dreambooth_with_both_text_encoders_keeps_both_in_the_sidecar_and_resumes_exactly(
        family_paths, pictures):
    """Saved in fp16: the .optim holds the fp32 U-Net and both text encoders (the second one
    too), and an interrupted run resumed from it repeats the uninterrupted one."""
    from safetensors.torch import load_file
    from tests.conftest import repeat_with_interruption
    from trainers.configs import DreamBoothConfig
    from trainers.formats.safe_load import safe_torch_load
    from trainers.methods.dreambooth import run
    cfg = DreamBoothConfig(model=SDXL, output_name="dbx16", train_data_dir=str(pictures),
                           instance_prompt="a photo of zxq cat", max_train_steps=3,
                           learning_rate=1e-3, sample_at_first=False, save_precision="fp16",
                           seed=3, train_text_encoder=True, **KOHYA).validate()

    def kept(path):
        weights = safe_torch_load(path.with_name(path.name + ".optim"))["danlu"]["weights"]
        assert set(weights) == {"unet", "text_encoder", "text_encoder_2"}

    def reset():
        for leftover in family_paths.stable_diffusion.glob("dbx16*"):
            leftover.unlink()
    repeat_with_interruption(run, cfg, family_paths, load=load_file, reset=reset,
                             after_first=kept)
