"""Resize LoRA (#21 item 4): each layer's change cut to a lower rank by SVD, written as a
kohya file diffusers loads; bad settings named; nothing on disk replaced silently."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, demo_images_with_lora, kohya_photos
from tests.test_lora_training import lora_config
from trainers.configs import ResizeLoraConfig
from trainers.formats.lora import load_lora, save_lora
from trainers.methods.lora import run as train_lora
from trainers.preflight import check_before_queueing
from trainers.resize_lora import layer_delta, resize_state, run


def random_lora(rank: int = 8) -> dict:
    torch.manual_seed(0)
    return {"lora_unet_a.lora_down.weight": torch.randn(rank, 16),
            "lora_unet_a.lora_up.weight": torch.randn(12, rank),
            "lora_unet_a.alpha": torch.tensor(4.0),
            "lora_unet_conv.lora_down.weight": torch.randn(rank, 6, 3, 3),
            "lora_unet_conv.lora_up.weight": torch.randn(10, rank, 1, 1),
            "lora_unet_conv.alpha": torch.tensor(float(rank))}


def test_each_layer_becomes_its_best_lower_rank_approximation():
    state = random_lora(8)
    small = resize_state(state, rank=3, conv_rank=2)
    assert small["lora_unet_a.lora_down.weight"].shape == (3, 16)
    assert small["lora_unet_a.lora_up.weight"].shape == (12, 3)
    assert small["lora_unet_conv.lora_down.weight"].shape == (2, 6, 3, 3)
    assert small["lora_unet_conv.lora_up.weight"].shape == (10, 2, 1, 1)
    for name, rank in (("lora_unet_a", 3), ("lora_unet_conv", 2)):
        full = layer_delta(state, name)
        s = torch.linalg.svdvals(full)
        error = torch.linalg.matrix_norm(full - layer_delta(small, name))
        # Eckart-Young: the best rank-r error is the norm of the dropped singular values
        assert float(error) == pytest.approx(float(s[rank:].norm()), rel=1e-4)
    same = resize_state(state, rank=16)  # a layer at or below the rank keeps its change
    assert same["lora_unet_a.lora_down.weight"].shape[0] == 8
    for name in ("lora_unet_a", "lora_unet_conv"):
        assert torch.allclose(layer_delta(same, name), layer_delta(state, name), atol=1e-4)


def test_a_trained_lora_resized_loads_in_diffusers_and_still_changes_the_image(data_paths, tmp_path):
    trained = train_lora(lora_config(kohya_photos(tmp_path / "train"), max_train_steps=4,
                                     learning_rate=5e-3, network_dim=4, conv_dim=2),
                         RecordingContext(data_paths))
    ctx = RecordingContext(data_paths)
    path = run(ResizeLoraConfig(lora=trained.name, output_name="small", rank=2,
                                save_precision="fp32"), ctx)
    assert path == data_paths.lora / "small.safetensors"
    state, meta = load_lora(path)
    assert {v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")} == {2}
    assert meta["ss_network_dim"] == "2" and "resized from mylora.safetensors" in \
        meta["ss_training_comment"]
    assert "% of its weight change kept" in ctx.events[-1].message
    base, with_lora = demo_images_with_lora(data_paths, path)
    assert not np.allclose(base, with_lora)


def test_bad_settings_are_named_and_nothing_is_replaced(data_paths):
    save_lora(data_paths.lora / "mine.safetensors", random_lora(4))
    before = (data_paths.lora / "mine.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="lora: choose the LoRA to resize"):
        ResizeLoraConfig(output_name="x").validate()
    with pytest.raises(ConfigError, match="rank"):
        ResizeLoraConfig(lora="mine.safetensors", output_name="x", rank=0).validate()
    with pytest.raises(ConfigError, match="output_name: choose a name other than"):
        ResizeLoraConfig(lora="mine.safetensors", output_name="mine").validate()
    with pytest.raises(ConfigError, match="lora: no file 'gone.safetensors'"):
        check_before_queueing(ResizeLoraConfig(lora="gone.safetensors", output_name="x").validate(),
                              data_paths)
    save_lora(data_paths.lora / "taken.safetensors", random_lora(2))
    taken = (data_paths.lora / "taken.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="output_name: taken.safetensors exists .* 'Overwrite'"):
        check_before_queueing(ResizeLoraConfig(lora="mine.safetensors", output_name="taken"),
                              data_paths)
    with pytest.raises(FileExistsError, match="taken.safetensors exists"):
        run(ResizeLoraConfig(lora="mine.safetensors", output_name="taken"),
            RecordingContext(data_paths))
    assert (data_paths.lora / "taken.safetensors").read_bytes() == taken
    assert (data_paths.lora / "mine.safetensors").read_bytes() == before
