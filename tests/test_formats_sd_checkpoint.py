"""Original-layout single-file checkpoints: written by us, read back by diffusers' own loader,
and compared key by key with the real SD1.5 / SD2 layouts (full-size models on the meta device)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from trainers.formats import sd_checkpoint as sc
from trainers.formats.sd_checkpoint import CheckpointLayoutError

ROOT = Path(__file__).resolve().parent.parent
SD1_SKELETON = ROOT / "trainers" / "model_configs" / "sd1"


# ---------------------------------------------------------------------------------------------
# tiny models with the real SD block structure (small widths), and a matching config folder

def tiny_sd_components(family: str = "sd1", seed: int = 0):
    """SD-layout UNet (4 down blocks, 3 with cross-attention, 2 layers each), 4-block VAE and a
    2-layer CLIP text model with random weights; `family` picks SD1 or SD2 flavour."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = family == "sd2"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=(2, 4, 4, 4) if sd2 else 8, use_linear_projection=sd2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, projection_dim=32,
        hidden_act="gelu" if sd2 else "quick_gelu"))
    # random (not default-initialised) norms and biases, so a swapped tensor cannot go unnoticed
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for name, param in module.named_parameters():
                if param.ndim == 1:
                    param.add_(torch.randn_like(param) * 0.05)
    for module in (unet, vae, text_encoder):
        module.eval()
    return unet, vae, text_encoder


def write_config_folder(folder: Path, unet, vae, text_encoder) -> Path:
    """A diffusers folder with the tiny models' configs, scheduler, tokenizer and no weights."""
    from trainers.tokenizer_files import write_clip_tokenizer

    folder.mkdir(parents=True)
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    text_encoder.config.save_pretrained(folder / "text_encoder")
    shutil.copytree(SD1_SKELETON / "scheduler", folder / "scheduler")
    shutil.copy(SD1_SKELETON / "model_index.json", folder / "model_index.json")
    write_clip_tokenizer(folder / "tokenizer")
    return folder


def pipeline_from_parts(folder: Path, unet, vae, text_encoder):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=PNDMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_single_file(path: Path, folder: Path):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, output_type: str):
    result = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64,
                  guidance_scale=7.5, output_type=output_type,
                  generator=torch.Generator().manual_seed(1234))
    images = result.images
    return images if isinstance(images, np.ndarray) else images.detach().numpy()


def assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module, what: str):
    got, want = loaded.state_dict(), original.state_dict()
    assert sorted(got) == sorted(want), what
    for key, value in want.items():
        assert not got[key].is_meta, f"{what}: {key} was not loaded"
        assert got[key].shape == value.shape, f"{what}: {key}"
        assert torch.allclose(got[key].float(), value.float(), atol=1e-6, rtol=0), f"{what}: {key}"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    unet, vae, text_encoder = tiny_sd_components("sd1")
    folder = write_config_folder(root / "config", unet, vae, text_encoder)
    path = sc.save_single_file(root / "tiny-sd1.safetensors", unet, vae, text_encoder,
                               dtype=torch.float32)
    return SimpleNamespace(root=root, folder=folder, path=path, unet=unet, vae=vae,
                           text_encoder=text_encoder)


# ---------------------------------------------------------------------------------------------
# round trip through diffusers' single-file loader

def test_sd1_file_loads_in_diffusers_with_identical_weights_and_images(sd1):
    loaded = load_single_file(sd1.path, sd1.folder)
    assert_same_weights(loaded.unet, sd1.unet, "unet")
    assert_same_weights(loaded.vae, sd1.vae, "vae")
    assert_same_weights(loaded.text_encoder, sd1.text_encoder, "text_encoder")

    original = pipeline_from_parts(sd1.folder, sd1.unet, sd1.vae, sd1.text_encoder)
    want_latents, got_latents = generate(original, "latent"), generate(loaded, "latent")
    assert np.abs(want_latents).max() > 0
    np.testing.assert_allclose(got_latents, want_latents, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        latents = torch.from_numpy(want_latents) / sd1.vae.config.scaling_factor
        want_pixels = original.vae.decode(latents).sample
        got_pixels = loaded.vae.decode(latents).sample
    assert want_pixels.std() > 0
    torch.testing.assert_close(got_pixels, want_pixels, atol=1e-5, rtol=1e-4)


def test_sd1_file_is_recognised_as_sd1_by_diffusers_and_by_us(sd1):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    tensors = safetensors.torch.load_file(sd1.path)
    assert infer_diffusers_model_type(tensors) == "v1"
    assert sc.detect_family(tensors) == "sd1"
    assert sc.detect_family(sc.read_shapes(sd1.path)) == "sd1"
    assert all(t.is_contiguous() for t in tensors.values())
    assert tensors[sc.SD1_TEXT_PREFIX + "embeddings.position_ids"].dtype == torch.int64
    assert tensors[sc.SD1_TEXT_PREFIX + "embeddings.position_ids"].tolist() == [list(range(77))]


def test_sd2_file_loads_in_diffusers_with_identical_weights(tmp_path):
    unet, vae, text_encoder = tiny_sd_components("sd2", seed=1)
    folder = write_config_folder(tmp_path / "config", unet, vae, text_encoder)
    path = sc.save_single_file(tmp_path / "tiny-sd2.safetensors", unet, vae, text_encoder,
                               dtype=torch.float32)
    shapes = sc.read_shapes(path)
    assert sc.detect_family(shapes) == "sd2"
    # fused q/k/v, linear proj_in, the restored unused last block
    assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (96, 32)
    assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (32, 32)
    assert "cond_stage_model.model.transformer.resblocks.2.ln_1.weight" in shapes

    loaded = load_single_file(path, folder)
    assert_same_weights(loaded.unet, unet, "unet")
    assert_same_weights(loaded.vae, vae, "vae")
    assert_same_weights(loaded.text_encoder, text_encoder, "text_encoder")


# ---------------------------------------------------------------------------------------------
# key names and shapes of the real layouts, from full-size models on the meta device

def full_size_components(family: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config = json.loads((SD1_SKELETON / "unet" / "config.json").read_text())
    text_config = json.loads((SD1_SKELETON / "text_encoder" / "config.json").read_text())
    if family == "sd2":  # stabilityai/stable-diffusion-2-1's diffusers configs
        unet_config.update(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                           use_linear_projection=True)
        text_config.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                           num_attention_heads=16, hidden_act="gelu", projection_dim=512)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(
            json.loads((SD1_SKELETON / "vae" / "config.json").read_text()))
        text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_config.items()
                                                       if k != "architectures"}))
    return unet, vae, text_encoder


def prefix_counts(keys) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        for prefix in (sc.UNET_PREFIX, sc.VAE_PREFIX, "cond_stage_model.transformer.",
                       sc.SD2_TEXT_PREFIX):
            if key.startswith(prefix):
                counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def test_sd15_key_names_and_shapes_match_the_original_layout():
    unet, vae, text_encoder = full_size_components("sd1")
    shapes = sc._shapes(sc.original_state_dict(unet, vae, text_encoder, family="sd1"))
    # counts of v1-5-pruned-emaonly (686 + 248 + 197 = 1131 weights besides the scheduler
    # buffers), checked against a published key list of the SD1 LDM layout
    assert prefix_counts(shapes) == {sc.UNET_PREFIX: 686, sc.VAE_PREFIX: 248,
                                     "cond_stage_model.transformer.": 197}
    assert len(shapes) == 1131
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight":
            (10240, 1280),
        "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm3.bias": (320,),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.norm_out.weight": (512,),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert not any(".resnets." in k or "down_blocks" in k or ".attentions." in k for k in shapes)


def test_full_size_sd15_reads_back_through_diffusers_converters():
    """diffusers' own original->diffusers converters give back every key with its shape."""
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    unet, vae, text_encoder = full_size_components("sd1")
    original = sc.original_state_dict(unet, vae, text_encoder, family="sd1")
    for module, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        back = sc._shapes(convert(dict(original), module.config))
        assert back == sc._shapes(module.state_dict())


def test_sdxl_unet_key_names_and_shapes():
    """The UNet converter follows the config: SDXL's 3 blocks, 2/10 transformer blocks per
    attention and label_emb give the 1680 `model.diffusion_model.*` keys of sd_xl_base_1.0."""
    from diffusers import UNet2DConditionModel
    config = dict(
        sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
        block_out_channels=[320, 640, 1280], layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    shapes = sc._shapes(sc.unet_to_original(unet.state_dict(), unet.config, linear_projection=True))
    assert len(shapes) == 1680
    expected = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.weight": (1280,),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert sc.detect_family(shapes) == "sdxl"


def test_sd2_key_names_and_shapes_match_the_original_layout():
    unet, vae, text_encoder = full_size_components("sd2")
    shapes = sc._shapes(sc.original_state_dict(unet, vae, text_encoder, family="sd2"))
    # OpenCLIP ViT-H: 24 blocks x 12 tensors + token/positional embedding, ln_final (2),
    # text_projection, logit_scale
    assert prefix_counts(shapes) == {sc.UNET_PREFIX: 686, sc.VAE_PREFIX: 248,
                                     sc.SD2_TEXT_PREFIX: 24 * 12 + 6}
    expected = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": (3072,),
        "cond_stage_model.model.transformer.resblocks.22.attn.out_proj.weight": (1024, 1024),
        "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.weight": (1024, 4096),
        "cond_stage_model.model.transformer.resblocks.23.ln_2.bias": (1024,),
        "cond_stage_model.model.ln_final.weight": (1024,),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.logit_scale": (),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert "cond_stage_model.model.transformer.resblocks.24.ln_1.weight" not in shapes


def test_text_encoder_keys_with_or_without_text_model_prefix():
    _, _, text_encoder = tiny_sd_components("sd1")
    plain = text_encoder.state_dict()
    prefixed = {"text_model." + k: v for k, v in plain.items()}
    a, b = sc.text_encoder_to_original(plain), sc.text_encoder_to_original(prefixed)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith(sc.SD1_TEXT_PREFIX) for k in a)


def test_sd2_fuses_q_k_v_in_order():
    _, _, text_encoder = tiny_sd_components("sd2")
    state = text_encoder.state_dict()
    out = sc.text_encoder_to_original(state, "sd2", restore_last_layer=False)
    fused = out["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    q, k, v = fused.split(32)
    assert torch.equal(q, state["encoder.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(k, state["encoder.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v, state["encoder.layers.1.self_attn.v_proj.weight"])
    assert "cond_stage_model.model.transformer.resblocks.2.ln_1.weight" not in out


# ---------------------------------------------------------------------------------------------
# dtype, metadata, errors, atomic writes

def test_fp16_and_bf16_saves_and_metadata(sd1, tmp_path):
    metadata = {"modelspec.title": "tiny", "ss_steps": "12", "note": "丹炉"}
    for dtype in (torch.float16, torch.bfloat16):
        path = sc.save_single_file(tmp_path / f"m-{dtype}.safetensors", sd1.unet, sd1.vae,
                                   sd1.text_encoder, dtype=dtype, metadata=metadata)
        with safetensors.safe_open(str(path), framework="pt") as handle:
            assert handle.metadata() == metadata
            dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}
        assert dtypes == {dtype, torch.int64}
        tensors = safetensors.torch.load_file(path)
        key = "model.diffusion_model.out.2.weight"
        assert torch.equal(tensors[key], sd1.unet.state_dict()["conv_out.weight"].to(dtype))
    with pytest.raises(TypeError, match="ss_steps"):
        sc.save_single_file(tmp_path / "bad.safetensors", sd1.unet, sd1.vae, sd1.text_encoder,
                            metadata={"ss_steps": 12})
    with pytest.raises(ValueError, match="dtype"):
        sc.save_single_file(tmp_path / "bad.safetensors", sd1.unet, sd1.vae, sd1.text_encoder,
                            dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        sc.save_single_file(tmp_path / "bad.ckpt", sd1.unet, sd1.vae, sd1.text_encoder)
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("part, key", [
    ("unet", "down_blocks.1.resnets.0.conv1.weight"),
    ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"),
    ("vae", "decoder.mid_block.attentions.0.to_q.weight"),
    ("vae", "encoder.conv_in.weight"),
    ("text", "encoder.layers.1.mlp.fc2.bias"),
    ("text", "embeddings.token_embedding.weight"),
])
def test_missing_key_is_named(sd1, part, key):
    module = {"unet": sd1.unet, "vae": sd1.vae, "text": sd1.text_encoder}[part]
    state = dict(module.state_dict())
    del state[key]
    convert = {"unet": lambda s: sc.unet_to_original(s, sd1.unet.config),
               "vae": sc.vae_to_original, "text": sc.text_encoder_to_original}[part]
    with pytest.raises(CheckpointLayoutError, match="missing") as caught:
        convert(state)
    assert repr(key) in str(caught.value)


def test_unexpected_and_misshapen_keys_are_named(sd1):
    state = dict(sd1.unet.state_dict())
    state["down_blocks.0.attentions.0.lora_A.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointLayoutError, match="unexpected.*lora_A"):
        sc.unet_to_original(state, sd1.unet.config)
    state = dict(sd1.unet.state_dict())
    state["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    with pytest.raises(CheckpointLayoutError, match=r"wrong shape for 'conv_in.weight'"):
        sc.unet_to_original(state, sd1.unet.config)


def test_overwrite_is_atomic(sd1, tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous checkpoint")
    real_save = safetensors.torch.save_file

    def crash_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        sc.save_single_file(target, sd1.unet, sd1.vae, sd1.text_encoder, dtype=torch.float32)
    assert target.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    sc.save_single_file(target, sd1.unet, sd1.vae, sd1.text_encoder, dtype=torch.float32)
    assert target.read_bytes() == sd1.path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# ---------------------------------------------------------------------------------------------
# family detection

def test_detect_family():
    sd1_keys = ["model.diffusion_model.out.2.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    sd2_keys = ["model.diffusion_model.out.2.weight",
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    sdxl_keys = ["model.diffusion_model.label_emb.0.0.weight",
                 "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                 "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    refiner_keys = ["conditioner.embedders.0.model.text_projection"]
    assert sc.detect_family(sd1_keys) == "sd1"
    assert sc.detect_family(set(sd2_keys)) == "sd2"
    assert sc.detect_family(iter(sdxl_keys)) == "sdxl"
    assert sc.detect_family(refiner_keys) == "sdxl"
    assert sc.detect_family([]) is None
    assert sc.detect_family(["lora_unet_down_blocks_0.alpha", "emb_params"]) is None
    # UNet-only files: the cross-attention width decides
    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert sc.detect_family({to_k: torch.Size([320, 768])}) == "sd1"
    assert sc.detect_family({to_k: (320, 1024)}) == "sd2"
    assert sc.detect_family({to_k: torch.empty(320, 2048, device="meta")}) == "sdxl"
    assert sc.detect_family([to_k]) is None
    assert sc.detect_family(["model.diffusion_model.label_emb.0.0.weight"]) == "sdxl"


def test_unknown_family_is_refused(sd1, tmp_path):
    with pytest.raises(ValueError, match="sdxl"):
        sc.save_single_file(tmp_path / "x.safetensors", sd1.unet, sd1.vae, sd1.text_encoder,
                            family="sdxl")
    with pytest.raises(ValueError, match="family"):
        sc.text_encoder_to_original(sd1.text_encoder.state_dict(), "sd3")
