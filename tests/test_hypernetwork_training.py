"""Hypernetwork creation and training end to end on the tiny model."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, repeat_with_interruption
from tests.test_textual_inversion import module_digest
from trainers.configs import CreateHypernetworkConfig, HypernetworkTrainingConfig
from trainers.formats.hypernetwork import load_hypernetwork
from trainers.hypernetworks import HypernetworkExists, create_hypernetwork
from trainers.methods.hypernetwork import render_with, run
from trainers.models import load_model
from trainers.sampling import PreviewSettings


def make(paths, name="hn", **changes):
    base = dict(name=name, sizes=[32, 64], model="tiny-demo", layer_structure="1, 2, 1",
                activation_func="relu", add_layer_norm=True)
    base.update(changes)
    return create_hypernetwork(CreateHypernetworkConfig(**base).validate(), paths)


def hn_config(dataset, **changes):
    base = dict(model="tiny-demo", hypernetwork="hn", data_root=str(dataset), width=64, height=64,
                steps=6, save_every=0, preview_every=0, learn_rate="0.001", seed=5)
    base.update(changes)
    return HypernetworkTrainingConfig(**base).validate()


def weights(net):
    return [p.detach().clone() for p in net.parameters()]


def test_only_the_hypernetwork_changes_and_files_are_written(data_paths, photo_dataset):
    path = make(data_paths)
    before = weights(load_hypernetwork(path))
    model = load_model(data_paths, "tiny-demo")
    digests = {n: module_digest(getattr(model, n)) for n in ("unet", "vae", "text_encoder")}
    ctx = RecordingContext(data_paths)
    run(hn_config(photo_dataset, save_every=3, preview_every=3, preview_steps=2), ctx)
    net = load_hypernetwork(path)
    assert net.step == 6
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(net)))
    assert {n: module_digest(getattr(model, n)) for n in digests} == digests
    processors = {type(p).__name__ for p in model.unet.attn_processors.values()}
    assert "HypernetworkAttnProcessor" not in processors  # restored after training
    folder = next((data_paths.outputs / "textual_inversion").glob("*/hn"))
    assert [p.name for p in (folder / "hypernetworks").iterdir()] == ["hn-3.pt"]
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["hn-3.png", "hn-6.png"]
    assert (folder / "hypernetwork_loss.csv").exists()
    assert path.with_name("hn.pt.optim").exists()


def test_training_lowers_loss(data_paths, photo_dataset):
    from trainers.data import load_dataset
    from trainers.hypernetwork_attention import applied
    from trainers.prompts import PromptEncoder
    from trainers.step import diffusion_loss
    path = make(data_paths)
    model = load_model(data_paths, "tiny-demo")
    data = load_dataset(photo_dataset, model.vae, 64, 64, varsize=False, batch_size=1, seed=0,
                        latent_sampling="deterministic", use_weight=False)
    encoder = PromptEncoder(model.tokenizer, model.text_encoder)

    def loss_of(net):
        total = 0.0
        net.train()
        with torch.no_grad(), applied(model.unet, net):
            for i, example in enumerate(data.examples):
                context = encoder.encode([example.filewords])
                for k in range(4):
                    total += diffusion_loss(model.unet, model.objective(), example.latent[None],
                                            context, torch.Generator().manual_seed(10 * i + k)).item()
        return total
    start = loss_of(load_hypernetwork(path))
    run(hn_config(photo_dataset, steps=40, learn_rate="0.003", latent_sampling="deterministic",
                  template="hypernetwork.txt", batch_size=4), RecordingContext(data_paths))
    assert loss_of(load_hypernetwork(path)) < start


def test_resume_repeats_the_uninterrupted_run(data_paths, photo_dataset, tmp_path):
    path = make(data_paths)
    pristine = tmp_path / "hn.pt"
    shutil.copy(path, pristine)
    cfg = hn_config(photo_dataset, steps=6, learn_rate="0.002:3, 0.001")

    def reset():
        shutil.copy(pristine, path)
        path.with_name("hn.pt.optim").unlink()
    repeat_with_interruption(run, cfg, data_paths, load=lambda p: weights(load_hypernetwork(p)),
                             reset=reset)


def test_strength_zero_renders_the_base_image(data_paths):
    path = make(data_paths, activation_func="linear", add_layer_norm=False)
    net = load_hypernetwork(path)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model = load_model(data_paths, "tiny-demo")
    settings = PreviewSettings(prompt="a cat", steps=2, width=64, height=64, seed=1)
    from trainers.prompts import PromptEncoder
    from trainers.sampling import render
    base, _ = render(model, PromptEncoder(model.tokenizer, model.text_encoder), settings)
    zero, _ = render_with(model, net, 0.0, settings)
    full, _ = render_with(model, net, 1.0, settings)
    assert np.array_equal(np.asarray(base), np.asarray(zero))
    assert not np.array_equal(np.asarray(base), np.asarray(full))


def test_create_refuses_existing_names_bad_structures_and_useless_sizes(data_paths):
    path = make(data_paths)
    original = path.read_bytes()
    with pytest.raises(HypernetworkExists):
        make(data_paths)
    assert path.read_bytes() == original
    with pytest.raises(ConfigError, match="layer_structure"):
        make(data_paths, name="b", layer_structure="2, 1")
    with pytest.raises(ConfigError, match="layer_structure"):
        make(data_paths, name="b", layer_structure="1, x, 1")
    with pytest.raises(ConfigError, match="dropout_structure"):
        make(data_paths, name="b", use_dropout=True, dropout_structure="0, 0.1")
    with pytest.raises(ConfigError, match="activation_func"):
        CreateHypernetworkConfig(name="b", activation_func="wobble").validate()
    with pytest.raises(ConfigError, match="none of 768"):
        make(data_paths, name="b", sizes=[768])
    with pytest.raises(ConfigError, match="name"):
        CreateHypernetworkConfig(name="a/b").validate()


def test_a_file_that_is_not_a_hypernetwork_is_refused(data_paths, photo_dataset):
    from trainers.formats.hypernetwork import HypernetworkFormatError
    bogus = data_paths.hypernetworks / "hn.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}}, bogus)
    with pytest.raises(HypernetworkFormatError, match="hn.pt"):
        run(hn_config(photo_dataset), RecordingContext(data_paths))


def test_the_page_offers_only_activations_the_engine_knows():
    from trainers.configs import HYPERNETWORK_ACTIVATIONS, WEIGHT_INITS
    from trainers.hypernetwork_net import ACTIVATIONS
    from trainers.hypernetwork_net import WEIGHT_INITS as ENGINE_INITS
    assert set(HYPERNETWORK_ACTIVATIONS) <= set(ACTIVATIONS)
    assert list(WEIGHT_INITS) == list(ENGINE_INITS)
