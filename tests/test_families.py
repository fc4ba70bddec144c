"""Model families: tiny SD1/SD2/SDXL-shaped models in the real diffusers layout, family detection
from folders and from original-layout single files (random weights), the shipped config
skeletons for SD 2.x (768-v) and SDXL, and loading each family offline."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from core.paths import Paths
from trainers import families, models
from trainers.formats import sd_checkpoint as sc
from trainers.families import demo_families
from trainers.tiny_model import (build_components, build_sd2_components,
                                 build_sdxl_components, build_tiny_model)

ROOT = Path(__file__).resolve().parent.parent
SKELETONS = ROOT / "trainers" / "model_configs"


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_model_dir):
    import shutil
    paths = Paths(tmp_path_factory.mktemp("families") / "data").ensure()
    shutil.copytree(tiny_model_dir, paths.cache / "tiny-demo")
    return paths


@pytest.mark.parametrize("name, family", sorted(demo_families().items()))
def test_tiny_models_load_in_their_family_pipeline(paths, name, family):
    folder = build_tiny_model(paths.cache / name, family=family)
    assert families.folder_family(folder) == family
    model = models.load_model(paths, name)
    assert model.family == family and model.is_demo
    assert type(model.text_encoder).__name__ == {"zimage": "Qwen3Model",
                                                 "chroma": "T5EncoderModel",
                                                 "flux2_klein": "Qwen3ForCausalLM",
                                                 "qwen_image": "Qwen2_5_VLForConditionalGeneration",
                                                 }.get(
                                                     family, "CLIPTextModel")
    if family == "sdxl":
        assert type(model.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert model.tokenizer_2.pad_token_id == 0  # OpenCLIP pads with "!"
        widths = (model.text_encoder.config.hidden_size, model.text_encoder_2.config.hidden_size)
        assert model.unet.config.cross_attention_dim == sum(widths)
        assert model.unet.config.addition_embed_type == "text_time"
    elif family == "flux1":
        assert type(model.text_encoder_2).__name__ == "T5EncoderModel"
        assert type(model.tokenizer_2).__name__.startswith("T5Tokenizer")
        assert type(model.unet).__name__ == "FluxTransformer2DModel"
        assert model.vae.config.latent_channels == 16 and model.vae.config.shift_factor
    elif family == "zimage":
        assert type(model.unet).__name__ == "ZImageTransformer2DModel"
        assert model.text_encoder_2 is None and model.vae.config.shift_factor
        assert model.tokenizer.pad_token == "<|endoftext|>"
    elif family == "chroma":
        assert type(model.unet).__name__ == "ChromaTransformer2DModel"
        assert type(model.tokenizer).__name__.startswith("T5Tokenizer")
        assert model.text_encoder_2 is None and model.vae.config.shift_factor
    elif family == "flux2_klein":
        assert type(model.unet).__name__ == "Flux2Transformer2DModel"
        assert type(model.vae).__name__ == "Flux2Latents"  # the training view (Family.training_vae)
        assert type(model.vae.vae).__name__ == "AutoencoderKLFlux2"
        assert model.text_encoder_2 is None and model.vae.vae.config.latent_channels == 32
        assert model.vae.config.latent_channels == 128  # patched 2x2
        assert model.tokenizer.pad_token == "<|endoftext|>"
    elif family == "qwen_image":
        assert type(model.unet).__name__ == "QwenImageTransformer2DModel"
        assert type(model.vae).__name__ == "QwenImageLatents"  # the training view
        assert type(model.vae.vae).__name__ == "AutoencoderKLQwenImage"
        assert model.text_encoder_2 is None and model.vae.config.latent_channels == 16
        assert model.tokenizer.pad_token == "<|endoftext|>"
    else:
        assert model.text_encoder_2 is None and model.tokenizer_2 is None
    expected = "v_prediction" if family == "sd2" else "epsilon"
    if family not in ("flux1", "zimage", "chroma", "flux2_klein", "qwen_image"):  # flow matching: the scheduler has no prediction type
        assert model.prediction_type == expected
    if family not in ("zimage", "chroma", "flux2_klein", "qwen_image"):
        assert model.tokenizer.pad_token_id == (0 if family == "sd2" else 49407)
    assert all(not p.requires_grad for m in (model.unet, *model.text_encoders)
               for p in m.parameters())


def _components(family: str, seed: int):
    return {"sd1": build_components, "sd2": build_sd2_components,
            "sdxl": build_sdxl_components}[family](seed)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_files_are_detected_and_load_with_the_same_weights(paths, family):
    parts = _components(family, seed=3)
    unet, vae, text_encoder = parts[:3]
    text_encoder_2 = parts[3] if family == "sdxl" else None
    demo = {v: k for k, v in demo_families().items()}[family]
    path = paths.stable_diffusion / f"random-{family}.safetensors"
    sc.save_single_file(path, unet, vae, text_encoder, dtype=torch.float32, family=family,
                        text_encoder_2=text_encoder_2, metadata={"danlu.base_config": demo})
    assert families.file_family(path) == family
    model = models.load_model(paths, path.name)
    assert model.family == family and not model.is_demo
    pairs = [(model.unet, unet), (model.vae, vae), (model.text_encoder, text_encoder)]
    if family == "sdxl":
        pairs.append((model.text_encoder_2, text_encoder_2))
    for loaded, original in pairs:
        got = loaded.state_dict()
        for key, value in original.state_dict().items():
            assert torch.equal(got[key].float(), value.float()), f"{family}: {key}"


def test_unet_only_and_ckpt_files_are_detected(tmp_path):
    """A file holding only a U-Net is judged by its context width; a .ckpt by its state dict."""
    unet, _, _ = build_sd2_components()
    only_unet = sc.unet_to_original(unet.state_dict(), unet.config, linear_projection=True)
    # the tiny model's context is 48 wide; a real SD2 U-Net's cross-attention takes 1024
    key = next(k for k in only_unet if k.endswith("attn2.to_k.weight"))
    real = dict(only_unet)
    real[key] = torch.zeros(only_unet[key].shape[0], 1024)
    safetensors.torch.save_file(real, str(tmp_path / "unet.safetensors"))
    assert families.file_family(tmp_path / "unet.safetensors") == "sd2"
    torch.save({"state_dict": {"cond_stage_model.transformer.text_model.x": torch.zeros(1)}},
               tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    assert families.file_family(tmp_path / "old.ckpt") == "sd1"


def test_unknown_files_and_folders_are_refused_by_name(tmp_path):
    safetensors.torch.save_file({"something.else": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(families.FamilyError, match="odd.safetensors.*SD 1.x, SD 2.x, SDXL, Flux.1, Z-Image, Chroma, Flux.2 Klein or Qwen-Image"):
        families.file_family(tmp_path / "odd.safetensors")
    paths = Paths(tmp_path / "data").ensure()
    (tmp_path / "odd.safetensors").rename(paths.stable_diffusion / "odd.safetensors")
    with pytest.raises(models.ModelError, match="odd.safetensors"):
        models.load_model(paths, "odd.safetensors")
    folder = tmp_path / "weird"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 99}))
    with pytest.raises(families.FamilyError, match="weird"):
        families.folder_family(folder)
    with pytest.raises(ValueError, match="family 'sd3'"):
        build_tiny_model(tmp_path / "x", family="sd3")


def test_sd2_yaml_beside_the_file_sets_the_prediction_type(tmp_path):
    path = tmp_path / "m.safetensors"
    assert families.prediction_type_beside(path) is None  # the SD2 skeleton's v-prediction holds
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert families.prediction_type_beside(path) == "v_prediction"
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert families.prediction_type_beside(path) == "epsilon"


def _skeleton_models(family: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text(sub, cls):
        config = json.loads((SKELETONS / family / sub / "config.json").read_text())
        config.pop("architectures", None)
        return cls(CLIPTextConfig(**config))

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            json.loads((SKELETONS / family / "unet" / "config.json").read_text()))
        te = text("text_encoder", CLIPTextModel)
        te2 = text("text_encoder_2", CLIPTextModelWithProjection) if family == "sdxl" else None
    return unet, te, te2


def test_sd2_skeleton_is_sd21_768_v():
    unet, te, _ = _skeleton_models("sd2")
    scheduler = json.loads((SKELETONS / "sd2" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert unet.config.sample_size * 8 == 768
    assert unet.config.cross_attention_dim == te.config.hidden_size == 1024
    assert te.config.hidden_act == "gelu" and te.config.num_hidden_layers == 23
    # 865.9M parameters in stable-diffusion-2-1's UNet
    assert abs(sum(p.numel() for p in unet.parameters()) - 865_910_724) < 1000
    assert families.folder_family(SKELETONS / "sd2") == "sd2"


def test_sdxl_skeleton_matches_sdxl_base_layout():
    unet, te, te2 = _skeleton_models("sdxl")
    assert (te.config.hidden_size, te2.config.hidden_size) == (768, 1280)
    assert unet.config.cross_attention_dim == 768 + 1280
    # size/crop conditioning: 6 numbers x 256 channels + the pooled 1280-wide projection
    assert unet.config.projection_class_embeddings_input_dim == 6 * 256 + te2.config.projection_dim
    assert abs(sum(p.numel() for p in unet.parameters()) - 2_567_463_684) < 1000
    assert families.folder_family(SKELETONS / "sdxl") == "sdxl"
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(json.loads((SKELETONS / "sdxl" / "vae" / "config.json").read_text()))
    shapes = sc._shapes(sc.original_state_dict(unet, vae, te, "sdxl", text_encoder_2=te2))
    counts = {}
    for key in shapes:
        prefix = ".".join(key.split(".")[:3]) if key.startswith("conditioner") else key.split(".")[0]
        counts[prefix] = counts.get(prefix, 0) + 1
    # sd_xl_base_1.0: 1680 U-Net, 248 VAE, CLIP-L 197 (with position ids), bigG 32 blocks x 12 + 6
    assert counts == {"model": 1680, "first_stage_model": 248,
                      "conditioner.embedders.0": 197, "conditioner.embedders.1": 32 * 12 + 6}
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert sc.detect_family(shapes) == "sdxl"


def test_sdxl_text_projection_is_written_transposed():
    *_, te2 = build_sdxl_components(width_2=48)
    te2.text_projection.weight.data = torch.randn(48, 48)
    out = sc.original_state_dict(*build_sdxl_components()[:3], "sdxl", text_encoder_2=te2)
    assert torch.equal(out["conditioner.embedders.1.model.text_projection"],
                       te2.text_projection.weight.t())
    with pytest.raises(ValueError, match="text_encoder_2"):
        sc.original_state_dict(*build_sdxl_components()[:3], "sdxl")


def test_guess_family_and_memory_estimate_follow_the_model(tmp_path):
    """Without loading (torch-free): demo names, folders and .safetensors headers give the family,
    and the memory estimate grows with it (SDXL LoRA > SD1 LoRA at the same settings)."""
    import subprocess
    import sys
    from trainers.configs import LoraConfig
    from trainers.memory_estimate import GB, estimate_for
    paths = Paths(tmp_path / "data").ensure()
    safetensors.torch.save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)},
                                str(paths.stable_diffusion / "xl.safetensors"))
    safetensors.torch.save_file({"cond_stage_model.model.ln_final.weight": torch.zeros(2)},
                                str(paths.stable_diffusion / "two.safetensors"))
    import shutil
    shutil.copytree(SKELETONS / "sdxl", paths.stable_diffusion / "xl-folder")
    assert families.guess_family(paths, "xl.safetensors") == "sdxl"
    assert families.guess_family(paths, "two.safetensors") == "sd2"
    assert families.guess_family(paths, "xl-folder") == "sdxl"
    assert families.guess_family(paths, "tiny-demo-sd2") == "sd2"
    assert families.guess_family(paths, "missing.ckpt") is None
    sd1 = estimate_for(LoraConfig(model="missing.ckpt", resolution=1024), paths).total
    sdxl = estimate_for(LoraConfig(model="xl.safetensors", resolution=1024), paths).total
    assert sdxl > 2 * sd1 and sdxl > 12 * GB
    # the page's process never imports torch for this
    code = ("import sys; from trainers.families import guess_family, detect_family; "
            "from trainers.memory_estimate import estimate_for; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_family_is_one_registered_adapter_that_detection_and_objectives_ask(tmp_path):
    """A toy flow-matching family registered here is told apart from a folder and from
    original-layout keys, and trains with the flow-matching objective."""
    import json as _json

    from trainers.objectives import FlowMatching, NoisePrediction
    toy = families.Family(name="toyflow", label="Toy flow", context_width=4096,
                          pipeline="FluxPipeline", text_key_prefix="toy_text_encoders.",
                          folder_marker=lambda index, unet: index.get("_class_name") == "ToyPipeline",
                          prediction="flow")
    families.register(toy)
    try:
        folder = tmp_path / "toy"
        folder.mkdir()
        (folder / "model_index.json").write_text(_json.dumps({"_class_name": "ToyPipeline"}))
        assert families.folder_family(folder) == "toyflow"
        assert families.detect_family(["toy_text_encoders.t5.weight", "model.x"]) == "toyflow"
        assert isinstance(families.get("toyflow").objective({}), FlowMatching)
        assert families.get("toyflow").pipeline_class().__name__ == "FluxPipeline"
        with pytest.raises(ValueError, match="already registered"):
            families.register(families.Family(name="toyflow", label="Other", context_width=1,
                                              pipeline="FluxPipeline"))
    finally:
        families.unregister("toyflow")
    assert isinstance(families.get("sd2").objective({"prediction_type": "v_prediction"}),
                      NoisePrediction)
    with pytest.raises(families.FamilyError, match="unknown model family 'toyflow'"):
        families.get("toyflow")


def test_a_family_with_a_demo_is_offered_loaded_and_refused_by_methods_it_is_not_for(
        paths, tmp_path):
    """A toy family registered here with its own demo model: the model dropdown lists the demo
    with its label, `--list` has a column for it, the demo builds and loads with the family's
    prompt encoder and preview pipeline, a method that does not list the family refuses its
    model before queueing, naming the families it trains, and the engine trains its demo."""
    import dataclasses

    from core.config import ConfigError
    from trainers import preflight
    from trainers.__main__ import catalog_table
    from trainers.conditioning import prompt_encoder
    from trainers.configs import LoraConfig
    from trainers.sampling import _pipeline
    from webui import choices

    sd1 = families.get("sd1")
    toy = dataclasses.replace(
        sd1, name="toy", label="Toy 1.x",
        demo=dataclasses.replace(sd1.demo, name="tiny-demo-toy", label="built-in toy demo"))
    families.register(toy)
    try:
        assert ("tiny-demo-toy (built-in toy demo)", "tiny-demo-toy") in choices.model_choices(paths)
        assert "Toy 1.x" in catalog_table().splitlines()[0]
        model = models.load_model(paths, "tiny-demo-toy")
        assert model.family == "toy" and model.spec is toy
        context = prompt_encoder(model).encode(["a photo"])
        assert context.shape[-1] == model.text_encoder.config.hidden_size
        assert type(_pipeline(model, model.unet, None)).__name__ == "StableDiffusionPipeline"
        with pytest.raises(ConfigError, match="tiny-demo-toy is a Toy 1.x model; LoRA trains "
                                              "SD 1.x, SD 2.x, SDXL, Flux.1, Z-Image, Chroma, Flux.2 Klein, Qwen-Image models"):
            preflight.check_before_queueing(LoraConfig(model="tiny-demo-toy"), paths)
        # the engine trains it through its adapter (a method that listed it would queue it)
        from tests.conftest import RecordingContext, kohya_photos
        from tests.test_lora_training import lora_config
        from trainers.formats.lora import load_lora
        from trainers.methods.lora import run
        ctx = RecordingContext(paths)
        trained = run(lora_config(kohya_photos(tmp_path / "train"), model="tiny-demo-toy",
                                  output_name="toylora", max_train_steps=2), ctx)
        assert load_lora(trained)[1]["ss_steps"] == "2" and len(ctx.losses) == 2
    finally:
        families.unregister("toy")
    assert "tiny-demo-toy" not in [v for _, v in choices.model_choices(paths)]


@pytest.mark.parametrize("method, config", [("xti", "XtiConfig"), ("apt", "AptConfig")])
def test_sd_only_methods_refuse_an_sdxl_model_before_queueing(family_paths, method, config):
    from core.config import ConfigError
    from trainers import catalog, configs, preflight
    title = catalog.get(method).title
    with pytest.raises(ConfigError, match=rf"model: tiny-demo-sdxl is a SDXL model; "
                                          rf"{re.escape(title)} trains SD 1.x, SD 2.x models"):
        preflight.check_before_queueing(getattr(configs, config)(model="tiny-demo-sdxl"),
                                        family_paths)


def test_a_loaded_model_of_another_family_is_refused_by_the_method():
    from types import SimpleNamespace

    from trainers import catalog
    sdxl = SimpleNamespace(family="sdxl")
    with pytest.raises(families.FamilyError, match="XTI \\(P\\+\\) trains SD 1.x, SD 2.x"):
        catalog.require_family("xti", sdxl, "mine.safetensors")
    catalog.require_family("lora", sdxl, "mine.safetensors")  # LoRA trains SDXL
