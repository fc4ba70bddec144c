"""Merge LoRAs into a checkpoint (#21 item 4): the single file diffusers loads renders what the
base model renders with the LoRA loaded (SD 1.x and SDXL, at weight 1 and 0.5); several files
and LyCORIS add up; bad settings are named and nothing is replaced."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext
from trainers.configs import MergeIntoCheckpointConfig
from trainers.formats.lora import save_lora
from trainers.formats.lycoris import lycoris_delta, save_lycoris
from trainers.lora_network import LoraNetwork, LoraSpec, kohya_module_map, merge_into
from trainers.merge_into_checkpoint import run
from trainers.models import load_model
from trainers.preflight import check_before_queueing

SDXL = "tiny-demo-sdxl"


def random_lora(paths, model_name: str, file_name: str, seed: int, conv_rank: int = 0):
    """A kohya LoRA (LoCon with conv_rank) for every module LoRA trains in the demo, with
    random up factors so that it changes the output; saved fp32 in models/Lora."""
    model = load_model(paths, model_name)
    torch.manual_seed(seed)
    with LoraNetwork(model.unet, model.text_encoder,
                     LoraSpec(rank=4, alpha=2.0, conv_rank=conv_rank, conv_alpha=1.0),
                     text_encoder_2=model.text_encoder_2) as network:
        with torch.no_grad():
            for param in network.parameters():
                param.normal_(0.0, 0.3)
        state = network.kohya_state_dict()
    save_lora(paths.lora / file_name, state)
    return state


def pipeline_class(model_name: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return StableDiffusionXLPipeline if model_name == SDXL else StableDiffusionPipeline


def picture(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("zxq cat", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.mark.parametrize("model_name", ["tiny-demo", SDXL])
def test_the_merged_checkpoint_renders_as_the_base_with_the_lora_loaded(family_paths, model_name):
    paths = family_paths
    random_lora(paths, model_name, "style.safetensors", seed=1, conv_rank=2 if model_name ==
                "tiny-demo" else 0)
    cls = pipeline_class(model_name)
    config = str(paths.cache / model_name)
    for weight in (1.0, 0.5):
        name = f"merged{weight:g}".replace(".", "")
        ctx = RecordingContext(paths)
        path = run(MergeIntoCheckpointConfig(model=model_name, loras=f"style.safetensors: {weight}",
                                             output_name=name, save_precision="fp32"), ctx)
        assert path == paths.stable_diffusion / f"{name}.safetensors"
        merged = cls.from_single_file(str(path), config=config, local_files_only=True)
        base = cls.from_pretrained(config)
        plain = picture(base)
        base.load_lora_weights(str(paths.lora / "style.safetensors"), adapter_name="style")
        base.set_adapters(["style"], [weight])
        with_lora, merged_image = picture(base), picture(merged)
        assert np.abs(plain - with_lora).max() > 0.05  # the LoRA does change the image
        np.testing.assert_allclose(merged_image, with_lora, atol=2e-3)
        assert "Merged style.safetensors x " in ctx.events[-1].message
    meta = _metadata(paths.stable_diffusion / "merged05.safetensors")
    assert json.loads(meta["danlu.merged_loras"])[0]["file"] == "style.safetensors"
    assert json.loads(meta["danlu.merged_loras"])[0]["weight"] == 0.5
    assert meta["danlu.base_model"] == model_name and meta["danlu.base_config"] == model_name
    # Danlu loads it too (its configs from the demo named in the metadata)
    assert load_model(paths, "merged05.safetensors").family == ("sdxl" if model_name == SDXL
                                                                else "sd1")


def _metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def test_two_loras_and_a_loha_add_up_at_their_weights(data_paths):
    paths = data_paths
    a = random_lora(paths, "tiny-demo", "a.safetensors", seed=1)
    b = random_lora(paths, "tiny-demo", "b.safetensors", seed=2, conv_rank=2)
    base = load_model(paths, "tiny-demo")
    modules = kohya_module_map(base.unet, base.text_encoder)
    name, conv = "lora_te_text_model_encoder_layers_0_self_attn_q_proj", \
        "lora_unet_down_blocks_0_resnets_0_conv1"
    torch.manual_seed(3)
    loha = {}
    for module, (out, inner) in ((name, modules[name].weight.shape[:2]),
                                 (conv, (modules[conv].weight.shape[0],
                                         modules[conv].weight[0].numel()))):
        loha.update({f"{module}.hada_w1_a": torch.randn(out, 2), f"{module}.hada_w1_b":
                     torch.randn(2, inner), f"{module}.hada_w2_a": torch.randn(out, 2),
                     f"{module}.hada_w2_b": torch.randn(2, inner),
                     f"{module}.alpha": torch.tensor(1.0)})
    save_lycoris(paths.lora / "hada.safetensors", loha)
    expected = {"unet": {k: v.clone() for k, v in base.unet.state_dict().items()},
                "text_encoder": {k: v.clone() for k, v in base.text_encoder.state_dict().items()}}
    path = run(MergeIntoCheckpointConfig(model="tiny-demo", loras="a.safetensors: 0.7, "
                                         "b.safetensors: -0.3, hada.safetensors: 0.5",
                                         output_name="three", save_precision="fp32"),
               RecordingContext(paths))
    fresh = load_model(paths, "tiny-demo", exclusive=True)  # the base, as loaded from disk
    unet, text_encoder = fresh.unet, fresh.text_encoder
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in expected["unet"].items())
    merge_into(unet, text_encoder, a, 0.7)
    merge_into(unet, text_encoder, b, -0.3)
    fresh_modules = kohya_module_map(unet, text_encoder)
    with torch.no_grad():
        for module in (name, conv):
            weight = fresh_modules[module].weight
            weight.add_(lycoris_delta(loha, module, weight.shape, 0.5))
    merged = load_model(paths, path.name)
    for part in ("unet", "text_encoder"):
        want, got = getattr(fresh, part).state_dict(), getattr(merged, part).state_dict()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_bad_merges_are_named_and_nothing_is_replaced(family_paths):
    paths = family_paths
    with pytest.raises(ConfigError, match="loras: name at least one LoRA"):
        MergeIntoCheckpointConfig(model="tiny-demo", output_name="x").validate()
    with pytest.raises(ConfigError, match="model: choose the base model"):
        MergeIntoCheckpointConfig(loras="a.safetensors", output_name="x").validate()
    with pytest.raises(ConfigError, match="loras: 'half' is not a weight"):
        MergeIntoCheckpointConfig(model="tiny-demo", loras="a.safetensors: half",
                                  output_name="x").validate()
    random_lora(paths, "tiny-demo", "sd1.safetensors", seed=1)
    with pytest.raises(ConfigError, match="loras: no file 'gone.safetensors'"):
        check_before_queueing(MergeIntoCheckpointConfig(
            model="tiny-demo", loras="sd1.safetensors, gone.safetensors",
            output_name="x").validate(), paths)
    with pytest.raises(ValueError, match="model: tiny-demo-flux is a Flux.* SD 1.x, SD 2.x, SDXL"):
        run(MergeIntoCheckpointConfig(model="tiny-demo-flux", loras="sd1.safetensors",
                                      output_name="flux"), RecordingContext(paths))
    with pytest.raises(ValueError, match="loras: sd1.safetensors does not fit this model: .* "
                       "name no module"):
        run(MergeIntoCheckpointConfig(model=SDXL, loras="sd1.safetensors", output_name="xl"),
            RecordingContext(paths))
    with pytest.raises(ValueError, match=r"loras: sd1.safetensors does not fit this model: "
                       r"lora_\w+: its change is \[\d+, \d+"):
        run(MergeIntoCheckpointConfig(model="tiny-demo-sd2", loras="sd1.safetensors",
                                      output_name="sd2"), RecordingContext(paths))
    assert not list(paths.stable_diffusion.glob("*.safetensors"))
    (paths.stable_diffusion / "taken.safetensors").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="output_name: taken.safetensors exists .* 'Overwrite'"):
        check_before_queueing(MergeIntoCheckpointConfig(model="tiny-demo", loras="sd1.safetensors",
                                                        output_name="taken"), paths)
    with pytest.raises(FileExistsError, match="taken.safetensors exists"):
        run(MergeIntoCheckpointConfig(model="tiny-demo", loras="sd1.safetensors",
                                      output_name="taken"), RecordingContext(paths))
    assert (paths.stable_diffusion / "taken.safetensors").read_bytes() == b"not a model"
