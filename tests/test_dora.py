"""DoRA (weight-decomposed LoRA, `dora_wd`) on the tiny SD1 and SDXL demos: the file's keys,
shapes and metadata; the weight its published formula implies equals what the trained peft
module applies (strength 1, 0.5 and 0); diffusers loads the diffusers-format copy as DoRA and
renders what Danlu's network renders; exact resume; refusals; the LoRA tools."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.config import ConfigError
from tests.conftest import RecordingContext, kohya_photos, repeat_with_interruption
from trainers.configs import LoraConfig, MergeIntoCheckpointConfig
from trainers.formats.dora import dora_delta
from trainers.formats.lora import load_lora, save_lora
from trainers.formats.lora_diffusers import diffusers_folder
from trainers.lora_network import LoraNetwork, LoraSpec, lora_delta
from trainers.loop import TrainingError
from trainers.methods.lora import run
from trainers.models import load_model

SDXL = "tiny-demo-sdxl"


@pytest.fixture
def kohya_folder(tmp_path):
    return kohya_photos(tmp_path / "train")


def dora_config(folder, **changes):
    base = dict(model="tiny-demo", output_name="dora", train_data_dir=str(folder), resolution=64,
                min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, network_dim=4,
                network_alpha=2.0, max_train_steps=3, save_every_n_epochs=0,
                sample_at_first=False, learning_rate=2e-2, seed=7, save_precision="fp32",
                dora_wd=True)
    base.update(changes)
    return LoraConfig(**base).validate()


def published_weight(weight, down, up, alpha, scale, on_output=True):
    """The DoRA paper's W' = m * (W + dW) / ||W + dW||, dW = alpha / rank * up @ down, with
    each output row's norm (LyCORIS wd_on_output) or each input column's (A1111's), written out
    here independently of Danlu."""
    rank = down.shape[0]
    delta = (alpha / rank) * (up.flatten(1).double() @ down.flatten(1).double())
    merged = weight.double() + delta.reshape(weight.shape)
    if on_output:
        rows = merged.flatten(1)
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        return (scale.double().reshape(-1, 1) * rows / norms).reshape(weight.shape)
    columns = merged.transpose(0, 1).flatten(1)  # [in, out * kh * kw]
    norms = torch.linalg.vector_norm(columns, dim=1)
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    return scale.double().reshape(shape) * merged / norms.reshape(shape)


def network_of(model, state, spec):
    return LoraNetwork(model.unet if spec.train_unet else None, model.text_encoder, spec,
                       text_encoder_2=model.text_encoder_2)


def check_weights_match_peft(model, cfg, state):
    """Every module's output through the trained peft layer equals the layer with the weight
    the file implies, W + s * (W' - W), at strength 1 and 0.5; 0 gives the base exactly."""
    spec = LoraSpec(rank=cfg.network_dim, alpha=cfg.network_alpha, conv_rank=cfg.conv_dim,
                    conv_alpha=cfg.conv_alpha, dora=True, dora_on_output=cfg.wd_on_output)
    generator = torch.Generator().manual_seed(0)
    moved = 0
    with network_of(model, state, spec) as network:
        network.load_kohya_state_dict(state)
        assert set(network.kohya_state_dict()) == set(state)
        for target in network.targets:
            layer = network._parts[target.part].layers[target.name]
            base = layer.get_base_layer()
            name = target.name
            scale = state[f"{name}.dora_scale"]
            ones = (1,) * (base.weight.dim() - 2)
            if cfg.wd_on_output:
                assert tuple(scale.shape) == (base.weight.shape[0], 1) + ones
                norm = base.weight.flatten(1).norm(dim=1)
            else:
                assert tuple(scale.shape) == (1, base.weight.shape[1]) + ones
                norm = base.weight.transpose(0, 1).flatten(1).norm(dim=1)
            moved += not torch.allclose(scale.flatten(), norm, rtol=1e-4)
            implied = published_weight(base.weight, state[f"{name}.lora_down.weight"],
                                       state[f"{name}.lora_up.weight"],
                                       float(state[f"{name}.alpha"]), scale,
                                       cfg.wd_on_output).float()
            if isinstance(base, torch.nn.Linear):
                x = torch.randn(2, 3, base.in_features, generator=generator)
                apply = (lambda w: F.linear(x, w, base.bias))
            else:
                x = torch.randn(1, base.in_channels, 6, 6, generator=generator)
                apply = (lambda w: F.conv2d(x, w, base.bias, base.stride, base.padding))
            with torch.no_grad():
                for strength in (1.0, 0.5):
                    network.set_strength(strength)
                    expected = apply(base.weight + strength * (implied - base.weight))
                    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
                network.set_strength(0.0)
                assert torch.equal(layer(x), base(x))
                network.set_strength(1.0)
    assert moved > len(network.targets) // 2  # the magnitudes trained, most of them


@pytest.mark.parametrize("on_output", [True, False])
def test_dora_run_writes_dora_scale_and_the_weight_its_formula_implies_is_what_peft_trained(
        data_paths, kohya_folder, on_output):
    model = load_model(data_paths, "tiny-demo")
    cfg = dora_config(kohya_folder, conv_dim=2, conv_alpha=1.0, wd_on_output=on_output)
    path = run(cfg, RecordingContext(data_paths))
    state, meta = load_lora(path)
    names = {key.split(".", 1)[0] for key in state}
    assert {key.split(".", 1)[1] for key in state} == {"lora_down.weight", "lora_up.weight",
                                                      "alpha", "dora_scale"}
    assert all(f"{name}.dora_scale" in state for name in names)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # LoCon with DoRA: [out, 1, 1, 1]
    fc1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # [64, 32]
    assert tuple(state[f"{conv}.dora_scale"].shape) == ((32, 1, 1, 1) if on_output
                                                        else (1, 32, 1, 1))
    assert tuple(state[f"{fc1}.dora_scale"].shape) == ((64, 1) if on_output else (1, 32))
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {
        "conv_dim": "2", "conv_alpha": "1", "algo": "lora", "dora_wd": "True",
        "wd_on_output": str(on_output)}
    check_weights_match_peft(model, cfg, state)


def test_dora_formula_on_either_axis_and_bad_scales():
    torch.manual_seed(0)
    weight, down, up = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    delta = lora_delta(down, up, 1.0)
    out_scale, in_scale = torch.rand(6, 1) + 0.5, torch.rand(1, 4) + 0.5
    merged = weight + delta
    torch.testing.assert_close(dora_delta(weight, delta, out_scale),
                               out_scale * merged / merged.norm(dim=1, keepdim=True) - weight)
    # A1111 / ComfyUI's input axis (older LyCORIS files): each input column's norm
    torch.testing.assert_close(dora_delta(weight, delta, in_scale, 0.5),
                               0.5 * (in_scale * merged / merged.norm(dim=0, keepdim=True) - weight))
    with pytest.raises(ValueError, match=r"dora_scale \[6\] fits neither axis"):
        dora_delta(weight, delta, torch.ones(6))


def pipeline(paths, model_name):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    cls = StableDiffusionXLPipeline if model_name == SDXL else StableDiffusionPipeline
    pipe = cls.from_pretrained(paths.cache / model_name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(pipe):
    return pipe("zxq cat", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.mark.parametrize("model_name", ["tiny-demo", SDXL])
def test_diffusers_loads_the_dora_copy_and_renders_what_the_network_renders(
        family_paths, kohya_folder, model_name):
    cfg = dora_config(kohya_folder, model=model_name, save_diffusers_format=True,
                      conv_dim=2 if model_name == "tiny-demo" else 0)
    path = run(cfg, RecordingContext(family_paths))
    state, _ = load_lora(path)
    pipe = pipeline(family_paths, model_name)
    plain = picture(pipe)
    spec = LoraSpec(rank=4, alpha=2.0, conv_rank=cfg.conv_dim, conv_alpha=cfg.conv_alpha,
                    dora=True)
    with LoraNetwork(pipe.unet, pipe.text_encoder, spec,
                     text_encoder_2=getattr(pipe, "text_encoder_2", None)) as network:
        network.load_kohya_state_dict(state)
        ours = picture(pipe)
    assert np.abs(ours - plain).max() > 0.01
    pipe = pipeline(family_paths, model_name)
    pipe.load_lora_weights(str(diffusers_folder(path)))
    parts = [pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if model_name == SDXL else [])
    for part in parts:  # peft's DoRA in every part, from lora_magnitude_vector
        assert any("lora_magnitude_vector" in n for n, _ in part.named_parameters())
    np.testing.assert_allclose(picture(pipe), ours, atol=1e-5)
    # the kohya file itself: diffusers 0.42 drops dora_scale and loads the LoRA part only
    pipe = pipeline(family_paths, model_name)
    pipe.load_lora_weights(str(path))
    assert not any("lora_magnitude_vector" in n for n, _ in pipe.unet.named_parameters())


@pytest.mark.parametrize("on_output", [True, False])
def test_interrupted_then_resumed_dora_run_repeats_the_uninterrupted_run(data_paths, kohya_folder,
                                                                         on_output):
    cfg = dora_config(kohya_folder, max_train_steps=4, lr_scheduler="cosine", train_batch_size=2,
                      conv_dim=2, conv_alpha=1.0, wd_on_output=on_output)

    def reset():
        for leftover in data_paths.lora.iterdir():
            leftover.unlink()
    repeat_with_interruption(run, cfg, data_paths, load=lambda path: load_lora(path)[0],
                             reset=reset)


def test_bad_dora_settings_are_named(family_paths, kohya_folder):
    from trainers.preflight import check_before_queueing
    with pytest.raises(ConfigError, match="dora_wd: DoRA is offered for network type 'lora'"):
        dora_config(kohya_folder, network_type="loha")
    with pytest.raises(ConfigError, match="wd_on_output: applies to DoRA only"):
        dora_config(kohya_folder, dora_wd=False, wd_on_output=False)
    with pytest.raises(ConfigError, match="save_diffusers_format: diffusers .peft. takes DoRA's"):
        dora_config(kohya_folder, wd_on_output=False, save_diffusers_format=True)
    with pytest.raises(ConfigError, match="fp8_base: DoRA"):
        dora_config(kohya_folder, fp8_base=True, mixed_precision="bf16")
    with pytest.raises(ConfigError, match="dora_wd: DoRA trains SD1/SD2/SDXL models only"):
        check_before_queueing(dora_config(kohya_folder, model="tiny-demo-flux",
                                          network_train_unet_only=True), family_paths)
    check_before_queueing(dora_config(kohya_folder, model=SDXL), family_paths)
    model = load_model(family_paths, "tiny-demo-flux")
    with pytest.raises(ValueError, match="DoRA trains the SD families"):
        LoraNetwork(model.unet, None, LoraSpec(rank=2, train_text_encoder=False, dora=True),
                    layout=model.spec.hook("lora_layout"))


def test_dora_and_plain_lora_files_do_not_continue_each_other(data_paths, kohya_folder):
    run(dora_config(kohya_folder, max_train_steps=1), RecordingContext(data_paths))
    with pytest.raises(TrainingError, match="cannot be continued.*unexpected keys.*dora_scale"):
        run(dora_config(kohya_folder, dora_wd=False, max_train_steps=2),
            RecordingContext(data_paths))
    run(dora_config(kohya_folder, output_name="plain", dora_wd=False, max_train_steps=1),
        RecordingContext(data_paths))
    with pytest.raises(TrainingError, match="cannot be continued.*missing keys.*dora_scale"):
        run(dora_config(kohya_folder, output_name="plain", max_train_steps=2),
            RecordingContext(data_paths))


def random_dora(paths, model_name, file_name, seed):
    model = load_model(paths, model_name)
    torch.manual_seed(seed)
    with LoraNetwork(model.unet, model.text_encoder,
                     LoraSpec(rank=4, alpha=2.0, conv_rank=2 if model_name == "tiny-demo" else 0,
                              conv_alpha=1.0, dora=True),
                     text_encoder_2=model.text_encoder_2) as network:
        with torch.no_grad():
            for param in network.parameters():
                param.add_(torch.randn(param.shape) * 0.2)
        state = network.kohya_state_dict()
    save_lora(paths.lora / file_name, state)
    return state


@pytest.mark.parametrize("model_name", ["tiny-demo", SDXL])
def test_merge_into_checkpoint_renders_as_the_base_with_the_dora_network(family_paths,
                                                                         model_name):
    from trainers.merge_into_checkpoint import run as merge
    paths = family_paths
    state = random_dora(paths, model_name, "dora.safetensors", seed=1)
    cls = type(pipeline(paths, model_name))
    spec = LoraSpec(rank=4, alpha=2.0, conv_rank=2 if model_name == "tiny-demo" else 0,
                    conv_alpha=1.0, dora=True)
    for weight in (1.0, 0.5):
        name = f"merged{weight:g}".replace(".", "")
        path = merge(MergeIntoCheckpointConfig(model=model_name, loras=f"dora.safetensors: {weight}",
                                               output_name=name, save_precision="fp32"),
                     RecordingContext(paths))
        merged = cls.from_single_file(str(path), config=str(paths.cache / model_name),
                                      local_files_only=True)
        merged.set_progress_bar_config(disable=True)
        pipe = pipeline(paths, model_name)
        plain = picture(pipe)
        with LoraNetwork(pipe.unet, pipe.text_encoder, spec,
                         text_encoder_2=getattr(pipe, "text_encoder_2", None)) as network:
            network.load_kohya_state_dict(state)
            network.set_strength(weight)
            ours = picture(pipe)
        assert np.abs(ours - plain).max() > 0.02
        np.testing.assert_allclose(picture(merged), ours, atol=2e-3)


@pytest.mark.parametrize("on_output", [True, False])
def test_compare_applies_a_dora_file_and_strength_zero_is_the_base(data_paths, kohya_folder,
                                                                   on_output):
    from types import SimpleNamespace

    from trainers.checkpoint_apply import lora
    path = run(dora_config(kohya_folder, network_train_unet_only=True, conv_dim=2,
                           wd_on_output=on_output), RecordingContext(data_paths))
    model = load_model(data_paths, "tiny-demo")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 77, model.text_encoder.config.hidden_size,
                          generator=torch.Generator().manual_seed(2))

    def denoise():
        with torch.no_grad():
            return model.unet(latents, 10, encoder_hidden_states=context).sample
    base = denoise()
    with lora(SimpleNamespace(clip_skip=1), data_paths, model, path, []) as (same, strength, _):
        strength(0.0)
        assert torch.equal(denoise(), base)
        strength(1.0)
        assert not torch.allclose(denoise(), base)
    assert torch.equal(denoise(), base)


def test_merging_and_resizing_dora_files_is_refused_by_name(data_paths):
    from trainers.configs import MergeLoraConfig, ResizeLoraConfig
    from trainers.merge_lora import run as merge_loras
    from trainers.resize_lora import run as resize
    state = random_dora(data_paths, "tiny-demo", "d.safetensors", seed=3)
    save_lora(data_paths.lora / "p.safetensors",
              {k: v for k, v in state.items() if not k.endswith(".dora_scale")})
    with pytest.raises(ValueError, match="loras: d.safetensors is a DoRA file"):
        merge_loras(MergeLoraConfig(loras="p.safetensors: 1, d.safetensors: 0.5",
                                    output_name="m"), RecordingContext(data_paths))
    with pytest.raises(ValueError, match="lora: d.safetensors is a DoRA file"):
        resize(ResizeLoraConfig(lora="d.safetensors", output_name="r", rank=2),
               RecordingContext(data_paths))
    assert sorted(p.name for p in data_paths.lora.iterdir()) == ["d.safetensors", "p.safetensors"]


def test_post_hoc_ema_averages_dora_scale_with_the_other_tensors():
    from trainers.lora_ema import post_hoc_ema
    first = {"m.lora_down.weight": torch.zeros(2, 3), "m.lora_up.weight": torch.zeros(4, 2),
             "m.alpha": torch.tensor(2.0), "m.dora_scale": torch.ones(4, 1)}
    second = {k: v + 1 if not k.endswith("alpha") else v for k, v in first.items()}
    averaged = post_hoc_ema([first, second], [0.25])
    torch.testing.assert_close(averaged["m.dora_scale"], torch.full((4, 1), 1.75))
    assert float(averaged["m.alpha"]) == 2.0


def test_an_input_axis_dora_file_is_refused_by_the_network_with_the_reason(data_paths):
    from trainers.lora_network import LoraStateError
    state = random_dora(data_paths, "tiny-demo", "d.safetensors", seed=4)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state[f"{name}.dora_scale"] = state[f"{name}.dora_scale"].reshape(1, -1)  # [1, in]
    model = load_model(data_paths, "tiny-demo")
    with LoraNetwork(model.unet, model.text_encoder,
                     LoraSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, dora=True)) as net:
        with pytest.raises(LoraStateError, match=f"{name}.dora_scale: file \\[1, 32\\].*on the "
                                                 "input axis, this network's on the output"):
            net.load_kohya_state_dict(state)
