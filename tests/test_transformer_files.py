"""The flow families' transformer-only single files: the original layouts (Black Forest Labs'
for Flux.1 / Chroma / Flux.2, Z-Image's own) both ways, checked against diffusers' own
single-file converters at real widths; detection by keys (Chroma and Flux.2 are not Flux.1);
and a file in models/Stable-diffusion loading as the family's model with the text encoders,
tokenizers and VAE of a matching diffusers folder, predicting as that folder does, training a
LoRA, and refused by name when nothing matches."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from core.paths import Paths
from trainers import families
from trainers.formats import transformer_layouts as layouts
from trainers.models import ModelError, load_model
from trainers.tiny_model import build_tiny_model

COMFY = "model.diffusion_model."


def _meta_model(cls, **config):
    with torch.device("meta"):
        return cls(**config)


def _thin_state(model) -> dict[str, torch.Tensor]:
    """Random values in the model's real row counts with one column: the converters split and
    join rows only, so this checks them at full width for a few kilobytes."""
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape[0], generator=gen).reshape(v.shape[0], *[1] * (v.dim() - 1))
            if v.dim() else torch.randn((), generator=gen) for k, v in model.state_dict().items()}


def _real_width_cases():
    from diffusers import (ChromaTransformer2DModel, Flux2Transformer2DModel,
                           FluxTransformer2DModel, ZImageTransformer2DModel)
    from diffusers.loaders import single_file_utils as su
    return [  # the published configs' widths with two blocks each
        ("flux1", FluxTransformer2DModel, dict(num_layers=2, num_single_layers=2, guidance_embeds=True),
         su.convert_flux_transformer_checkpoint_to_diffusers, layouts.FLUX),
        ("chroma", ChromaTransformer2DModel, dict(num_layers=2, num_single_layers=2),
         su.convert_chroma_transformer_checkpoint_to_diffusers, layouts.FLUX),
        ("flux2_klein", Flux2Transformer2DModel, dict(num_layers=2, num_single_layers=2),
         su.convert_flux2_transformer_checkpoint_to_diffusers, layouts.FLUX2),
        ("zimage", ZImageTransformer2DModel, dict(n_layers=2, n_refiner_layers=1),
         su.convert_z_image_transformer_checkpoint_to_diffusers, layouts.ZIMAGE),
    ]


@pytest.mark.parametrize("case", range(4), ids=["flux1", "chroma", "flux2", "zimage"])
def test_layouts_match_diffusers_converters_at_real_width(case):
    family, cls, config, convert, layout = _real_width_cases()[case]
    state = _thin_state(_meta_model(cls, **config))
    original = layout.to_original(state)
    assert not any(".to_q." in k or ".to_k." in k for k in original)  # q, k, v fused
    prefixed = {COMFY + k: v for k, v in original.items()} if family != "flux2_klein" else dict(original)
    theirs = convert(dict(prefixed))
    ours = layout.to_diffusers({COMFY + k: v for k, v in original.items()})
    assert set(theirs) == set(ours) == set(state)
    for key, tensor in state.items():
        assert torch.equal(theirs[key], tensor) and torch.equal(ours[key], tensor), key
    # the file is told apart by its own keys, with or without ComfyUI's prefix
    assert families.detect_family({k: tuple(v.shape) for k, v in original.items()}) == family
    assert families.detect_family({COMFY + k: tuple(v.shape) for k, v in original.items()}) == family


def test_flux_names_are_black_forest_labs():
    from diffusers import FluxTransformer2DModel
    original = layouts.FLUX.to_original(_thin_state(_meta_model(
        FluxTransformer2DModel, num_layers=1, num_single_layers=1, guidance_embeds=True)))
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
            "single_blocks.0.norm.key_norm.scale", "guidance_in.in_layer.weight",
            "final_layer.adaLN_modulation.1.weight", "vector_in.out_layer.bias"} <= set(original)
    assert original["single_blocks.0.linear1.weight"].shape[0] == 3 * 3072 + 4 * 3072


def test_unknown_keys_are_named():
    from diffusers import ChromaTransformer2DModel
    original = layouts.FLUX.to_original(_thin_state(_meta_model(
        ChromaTransformer2DModel, num_layers=1, num_single_layers=1)))
    original["double_blocks.0.img_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(layouts.TransformerLayoutError, match="img_attn.extra"):
        layouts.FLUX.to_diffusers(original)
    with pytest.raises(layouts.TransformerLayoutError, match="img_in.weight"):
        layouts.FLUX.to_diffusers({"txt_in.weight": torch.zeros(1)})


DEMOS = {"flux1": "tiny-demo-flux", "chroma": "tiny-demo-chroma", "zimage": "tiny-demo-zimage",
         "flux2_klein": "tiny-demo-flux2"}


def _demo_transformer_file(paths: Paths, family: str, name: str, prefix: str = "") -> tuple:
    """The family's demo built in the data folder, and its transformer (weights changed, so the
    file is not the demo) written as an original-layout file under models/Stable-diffusion."""
    from diffusers import DiffusionPipeline
    folder = build_tiny_model(paths.cache / DEMOS[family], family=family)
    transformer = DiffusionPipeline.from_pretrained(folder).transformer
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(0.01)
    layout = families.get(family).hook("transformer_file")
    state = {prefix + k: v.contiguous() for k, v in layout.to_original(transformer.state_dict()).items()}
    path = paths.stable_diffusion / name
    save_file(state, str(path))
    return path, transformer


@pytest.mark.parametrize("family", ["flux1", "chroma", "zimage", "flux2_klein"])
def test_a_transformer_file_loads_with_a_matching_folder(tmp_path, family):
    paths = Paths(tmp_path / "data").ensure()
    path, transformer = _demo_transformer_file(paths, family, f"my-{family}.safetensors",
                                               prefix=COMFY if family == "flux1" else "")
    assert families.guess_family(paths, path.name) == family
    model = load_model(paths, path.name)
    assert model.family == family and model.short_hash and model.source == str(path)
    loaded = dict(model.unet.state_dict())
    for key, tensor in transformer.state_dict().items():
        assert torch.equal(loaded[key], tensor), key
    assert model.text_encoder is not None and model.vae is not None


def test_a_diffusers_folder_in_models_is_the_companion(tmp_path):
    """The text encoders come from the user's own diffusers folder of the family when its
    transformer has the file's shape, before the demo."""
    paths = Paths(tmp_path / "data").ensure()
    path, _ = _demo_transformer_file(paths, "chroma", "chroma-ft.safetensors")
    shutil.copytree(paths.cache / "tiny-demo-chroma", paths.stable_diffusion / "Chroma-base")
    from trainers.transformer_file import companion_folder
    assert companion_folder(paths, path, "chroma") == paths.stable_diffusion / "Chroma-base"


def test_no_matching_folder_is_refused_by_name(tmp_path):
    from diffusers import FluxTransformer2DModel
    paths = Paths(tmp_path / "data").ensure()
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    state = {k: v.contiguous() for k, v in layouts.FLUX.to_original(model.state_dict()).items()}
    save_file(state, str(paths.stable_diffusion / "odd-flux.safetensors"))
    with pytest.raises(ModelError, match="odd-flux.safetensors holds only a Flux.1 transformer"):
        load_model(paths, "odd-flux.safetensors")


def test_a_lora_trains_on_a_transformer_file(tmp_path):
    from tests.conftest import RecordingContext, kohya_photos
    from trainers.configs import LoraConfig
    from trainers.methods.lora import run
    paths = Paths(tmp_path / "data").ensure()
    path, _ = _demo_transformer_file(paths, "flux1", "flux-ft.safetensors")
    config = LoraConfig(model=path.name, output_name="onfile", resolution=64,
                        train_data_dir=str(kohya_photos(tmp_path / "train")), min_bucket_reso=32,
                        max_bucket_reso=128, bucket_reso_steps=16, network_dim=4, network_alpha=2.0,
                        max_train_steps=2, save_every_n_epochs=0, seed=1, save_precision="fp32",
                        network_train_unet_only=True).validate()
    ctx = RecordingContext(paths)
    run(config, ctx)
    saved = paths.lora / "onfile.safetensors"
    assert saved.is_file()
    from trainers.formats.lora import load_lora
    state, metadata = load_lora(saved)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in state)
    assert metadata.get("ss_sd_model_name") == "flux-ft"  # kohya writes the stem


def _fp8(tensor: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI-style scaled fp8: the weight divided by its scale (per tensor or per row) so its
    largest value sits at fp8's top, stored as float8_e4m3fn."""
    top = torch.finfo(torch.float8_e4m3fn).max
    peak = tensor.abs().amax(dim=tuple(range(1, tensor.dim()))) if per_row else tensor.abs().max()
    scale = (peak / top).clamp(min=1e-12)
    shaped = scale.reshape(-1, *[1] * (tensor.dim() - 1)) if per_row else scale
    return (tensor / shaped).to(torch.float8_e4m3fn), scale.to(torch.float32)


@pytest.mark.parametrize("style", ["legacy", "comfy_quant", "plain"])
def test_an_fp8_transformer_file_loads_as_its_dequantized_weights(tmp_path, style):
    """ComfyUI's fp8 files: the legacy `*_fp8_scaled` (scale_weight + the scaled_fp8 marker),
    the newer layout (weight_scale + a comfy_quant JSON tensor, per-row scales here) and plain
    fp8 weights without a scale."""
    import json

    from safetensors.torch import load_file
    paths = Paths(tmp_path / "data").ensure()
    path, transformer = _demo_transformer_file(paths, "flux1", "flux-fp8.safetensors", COMFY)
    state, expected = load_file(str(path)), {}
    for key in [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]:
        stem = key[: -len(".weight")]
        if style == "plain":
            state[key] = state[key].to(torch.float8_e4m3fn)
            expected[key] = state[key].float()
            continue
        state[key], scale = _fp8(state[key], per_row=style == "comfy_quant")
        if style == "legacy":
            state[stem + ".scale_weight"] = scale
            state[stem + ".scale_input"] = torch.ones(())
        else:
            state[stem + ".weight_scale"] = scale
            state[stem + ".comfy_quant"] = torch.tensor(
                list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
        expected[key] = state[key].float() * (scale.reshape(-1, 1) if scale.dim() else scale)
    if style == "legacy":
        state[COMFY + "scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(state, str(path))
    assert families.guess_family(paths, path.name) == "flux1"
    model = load_model(paths, path.name)
    loaded = layouts.FLUX.to_original(dict(model.unet.state_dict()))
    assert expected and all(torch.equal(loaded[k[len(COMFY):]], v) for k, v in expected.items())
    original = layouts.FLUX.to_original(transformer.state_dict())
    for key in expected:  # fp8 keeps about two significant digits
        error = (loaded[key[len(COMFY):]] - original[key[len(COMFY):]]).norm()
        assert error <= 0.08 * original[key[len(COMFY):]].norm(), key


def test_a_layer_quantized_in_another_format_is_refused_by_name(tmp_path):
    import json

    from safetensors.torch import load_file
    paths = Paths(tmp_path / "data").ensure()
    path, _ = _demo_transformer_file(paths, "zimage", "z-nvfp4.safetensors")
    state = load_file(str(path))
    key = next(k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2)
    state[key[: -len(".weight")] + ".comfy_quant"] = torch.tensor(
        list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file(state, str(path))
    with pytest.raises(ModelError, match=f"z-nvfp4.safetensors: {key}: quantized as 'nvfp4'"):
        load_model(paths, path.name)
