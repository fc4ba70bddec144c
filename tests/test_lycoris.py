"""LyCORIS LoHa / LoKr runs on the tiny SD1 and SDXL demos: the file's keys and metadata, the
delta its published formula implies against what the trained peft module applies, strength 0,
exact resume, refusals, the Compare grid."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from core.config import ConfigError
from tests.conftest import RecordingContext, kohya_photos, repeat_with_interruption
from tests.test_textual_inversion import module_digest
from trainers.configs import LoraConfig
from trainers.formats.lycoris import LOHA_KEYS, load_adapter, lycoris_delta
from trainers.lora_network import LoraStateError, find_targets, text_encoder_prefixes
from trainers.lycoris_network import LycorisNetwork, LycorisSpec, spec_from_state
from trainers.loop import TrainingError
from trainers.methods.lora import run
from trainers.models import load_model


@pytest.fixture
def kohya_folder(tmp_path):
    return kohya_photos(tmp_path / "train")


def lycoris_config(folder, **changes):
    base = dict(model="tiny-demo", output_name="lyco", train_data_dir=str(folder), resolution=64,
                min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, network_dim=4,
                network_alpha=2.0, max_train_steps=3, save_every_n_epochs=0,
                sample_at_first=False, learning_rate=5e-3, seed=7, save_precision="fp32")
    base.update(changes)
    return LoraConfig(**base).validate()


def kohya_names(model) -> list[str]:
    """The kohya LoRA names Danlu writes for this model (U-Net and text encoders)."""
    names = [t.name for t in find_targets(model.unet, "unet", False)]
    prefixes = text_encoder_prefixes(model.text_encoder_2)
    for part in prefixes:
        names += [t.name for t in find_targets(getattr(model, part), part, False, prefixes[part])]
    return names


def module_keys(state, name) -> set[str]:
    return {key.split(".", 1)[1] for key in state if key.split(".", 1)[0] == name}


def check_file_keys(state, names, algo):
    assert sorted({key.split(".", 1)[0] for key in state}) == sorted(names)
    assert not any("lora_down" in key or "lora_up" in key for key in state)
    kinds = set()
    for name in names:
        keys = module_keys(state, name)
        if algo == "loha":
            assert keys == set(LOHA_KEYS) | {"alpha"}, name
        else:
            w2 = keys - {"alpha", "lokr_w1"}
            assert "lokr_w1" in keys and "alpha" in keys and w2 in ({"lokr_w2"},
                                                                     {"lokr_w2_a", "lokr_w2_b"}), name
            kinds.add(frozenset(w2))
    return kinds


def check_deltas_match_peft(model, cfg, state, algo):
    """Load the file into a fresh network: every module's output change equals F.linear /
    conv2d with the delta lycoris_delta computes from the file; strength 0 is the base."""
    spec = LycorisSpec(rank=cfg.network_dim, alpha=cfg.network_alpha, algo=algo,
                       factor=cfg.lokr_factor)
    with LycorisNetwork(model.unet, model.text_encoder, spec,
                        text_encoder_2=model.text_encoder_2) as network:
        network.load_kohya_state_dict(state)
        assert set(network.kohya_state_dict()) == set(state)
        generator = torch.Generator().manual_seed(0)
        for target in network.targets:
            layer = network.layer(target.name)
            base = layer.get_base_layer()
            delta = lycoris_delta(state, target.name, base.weight.shape)
            assert delta.abs().max() > 0, target.name  # trained
            if isinstance(base, torch.nn.Linear):
                x = torch.randn(2, 3, base.in_features, generator=generator)
                expected = F.linear(x, delta)
            else:
                x = torch.randn(1, base.in_channels, 6, 6, generator=generator)
                expected = F.conv2d(x, delta, None, base.stride, base.padding)
            with torch.no_grad():
                plain, adapted = base(x), layer(x)
                torch.testing.assert_close(adapted - plain, expected, rtol=1e-4, atol=1e-5)
                network.set_strength(0.0)
                assert torch.equal(layer(x), plain)
                network.set_strength(1.0)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_run_writes_lycoris_keys_whose_delta_is_what_peft_trained(
        data_paths, kohya_folder, algo):
    model = load_model(data_paths, "tiny-demo")
    digests = {n: module_digest(getattr(model, n)) for n in ("unet", "text_encoder", "vae")}
    cfg = lycoris_config(kohya_folder, network_type=algo)
    path = run(cfg, RecordingContext(data_paths))
    state, meta = load_adapter(path)
    kinds = check_file_keys(state, kohya_names(model), algo)
    if algo == "lokr":  # rank 4: full w2 for 32/64-wide layers, factored for 128-wide ones
        assert kinds == {frozenset({"lokr_w2"}), frozenset({"lokr_w2_a", "lokr_w2_b"})}
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == algo and (args.get("factor") == "-1") == (algo == "lokr")
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "3"
    assert {n: module_digest(getattr(model, n)) for n in digests} == digests
    check_deltas_match_peft(model, cfg, state, algo)
    assert {n: module_digest(getattr(model, n)) for n in digests} == digests

    if algo == "loha":  # a LoRA run cannot continue a LoHa file, and says so
        with pytest.raises(TrainingError, match="cannot be continued.*unexpected keys"):
            run(lycoris_config(kohya_folder, max_train_steps=4), RecordingContext(data_paths))


def test_sdxl_lokr_file_names_kohya_sdxl_modules_with_locon_convs(family_paths, kohya_folder):
    model = load_model(family_paths, "tiny-demo-sdxl")
    cfg = lycoris_config(kohya_folder, model="tiny-demo-sdxl", network_type="lokr",
                         network_dim=2, conv_dim=2, conv_alpha=1.0)
    state, meta = load_adapter(run(cfg, RecordingContext(family_paths)))
    # with conv_dim, LoCon's module set: the ResNet blocks' convs and time_emb_proj too
    names = [t.name for t in find_targets(model.unet, "unet", True)] + \
        [n for n in kohya_names(model) if n.startswith("lora_te")]
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_")
                                                                 for n in names)
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    check_file_keys(state, names, "lokr")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1",
                                                   "algo": "lokr", "factor": "-1"}
    convs = {t.name for t in find_targets(model.unet, "unet", True) if t.conv}
    spec = spec_from_state(state, convs)
    assert (spec.algo, spec.rank, spec.alpha, spec.conv_rank) == ("lokr", 2, 2.0, 2)
    with LycorisNetwork(model.unet, model.text_encoder, spec,
                        text_encoder_2=model.text_encoder_2) as network:
        network.load_kohya_state_dict(state)
        for name in sorted(convs)[:2]:
            layer = network.layer(name)
            base = layer.get_base_layer()
            x = torch.randn(1, base.in_channels, 6, 6)
            with torch.no_grad():
                torch.testing.assert_close(
                    layer(x) - base(x), F.conv2d(x, lycoris_delta(state, name, base.weight.shape),
                                                 None, base.stride, base.padding),
                    rtol=1e-4, atol=1e-5)


def test_interrupted_then_resumed_lokr_repeats_the_uninterrupted_run(data_paths, kohya_folder):
    cfg = lycoris_config(kohya_folder, network_type="lokr", max_train_steps=4, lokr_factor=4,
                         lr_scheduler="cosine", train_batch_size=2)

    def after_first(path):
        assert load_adapter(path)[1]["ss_steps"] == "2"

    def reset():
        for leftover in data_paths.lora.iterdir():
            leftover.unlink()
    repeat_with_interruption(run, cfg, data_paths, load=lambda path: load_adapter(path)[0],
                             reset=reset, after_first=after_first)


def test_compare_grid_applies_a_loha_file(data_paths, kohya_folder):
    from types import SimpleNamespace

    from trainers.checkpoint_apply import lora
    path = run(lycoris_config(kohya_folder, network_type="loha", network_train_unet_only=True),
               RecordingContext(data_paths))
    model = load_model(data_paths, "tiny-demo")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 77, model.text_encoder.config.hidden_size,
                          generator=torch.Generator().manual_seed(2))

    def denoise():
        with torch.no_grad():
            return model.unet(latents, 10, encoder_hidden_states=context).sample
    base = denoise()
    with lora(SimpleNamespace(clip_skip=1), data_paths, model, path, []) as (same, strength, _):
        assert same is model
        strength(0.0)
        assert torch.equal(denoise(), base)
        strength(1.0)
        assert not torch.allclose(denoise(), base)
    assert torch.equal(denoise(), base)


def test_bad_lycoris_settings_are_named(family_paths, kohya_folder):
    from trainers.preflight import check_before_queueing
    with pytest.raises(ConfigError, match="network_type"):
        lycoris_config(kohya_folder, network_type="lycoris")
    for factor in (0, -2):
        with pytest.raises(ConfigError, match="lokr_factor"):
            lycoris_config(kohya_folder, network_type="lokr", lokr_factor=factor)
    with pytest.raises(ConfigError, match="save_diffusers_format"):
        lycoris_config(kohya_folder, network_type="loha", save_diffusers_format=True)
    with pytest.raises(ConfigError, match="network_type: loha trains SD1/SD2/SDXL models only"):
        check_before_queueing(lycoris_config(kohya_folder, model="tiny-demo-flux",
                                             network_type="loha", network_train_unet_only=True),
                              family_paths)
    check_before_queueing(lycoris_config(kohya_folder, model="tiny-demo-sdxl",
                                         network_type="loha"), family_paths)
    with pytest.raises(ValueError, match="factor"):
        LycorisSpec(algo="lokr", factor=0).validate()


def test_a_lycoris_state_that_does_not_fit_is_refused_by_name(data_paths):
    model = load_model(data_paths, "tiny-demo")
    with LycorisNetwork(model.unet, model.text_encoder, LycorisSpec(rank=2, algo="loha")) as net:
        state = net.kohya_state_dict()
        name = net.targets[0].name
        broken = dict(state)
        broken.pop(f"{name}.hada_w2_b")
        broken[f"{name}.hada_w1_a"] = torch.zeros(3, 3)
        broken["lora_unet_nowhere.hada_w1_a"] = torch.zeros(1)
        with pytest.raises(LoraStateError) as error:
            net.load_kohya_state_dict(broken)
        for words in (f"{name}.hada_w2_b", f"{name}.hada_w1_a: file [3, 3]", "lora_unet_nowhere"):
            assert words in str(error.value)
