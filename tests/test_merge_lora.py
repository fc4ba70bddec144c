"""Merge LoRAs (#21 item 4): the merged file's change is the weighted sum of the files' changes
(exactly, or cut to a rank), diffusers loads it, and bad settings are named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, demo_images_with_lora, kohya_photos
from tests.test_lora_training import lora_config
from tests.test_resize_lora import random_lora
from trainers.configs import MergeLoraConfig
from trainers.formats.lora import load_lora, save_lora
from trainers.merge_lora import merge_states, run
from trainers.methods.lora import run as train_lora
from trainers.preflight import check_before_queueing
from trainers.resize_lora import layer_delta


def test_the_merged_change_is_the_weighted_sum():
    a, b = random_lora(4), random_lora(2)
    b = {k: v * 0.5 + 0.1 for k, v in b.items()}
    b["lora_unet_only_b.lora_down.weight"] = torch.ones(2, 5)
    b["lora_unet_only_b.lora_up.weight"] = torch.ones(3, 2)
    merged = merge_states([(a, 0.7), (b, -0.3)])
    for name in ("lora_unet_a", "lora_unet_conv"):
        want = 0.7 * layer_delta(a, name) - 0.3 * layer_delta(b, name)
        assert torch.allclose(layer_delta(merged, name), want, atol=1e-5)
    assert merged["lora_unet_a.lora_down.weight"].shape[0] == 6  # the ranks add up
    assert torch.allclose(layer_delta(merged, "lora_unet_only_b"),
                          -0.3 * layer_delta(b, "lora_unet_only_b"))
    with pytest.raises(ValueError, match="lora_unet_a has different shapes"):
        merge_states([(a, 1.0), ({"lora_unet_a.lora_down.weight": torch.ones(2, 7),
                                  "lora_unet_a.lora_up.weight": torch.ones(12, 2)}, 1.0)])


def test_two_trained_loras_merge_into_a_file_diffusers_loads(data_paths, tmp_path):
    folder = kohya_photos(tmp_path / "train")
    for name, seed in (("one", 1), ("two", 2)):
        train_lora(lora_config(folder, output_name=name, seed=seed, max_train_steps=3,
                               learning_rate=5e-3), RecordingContext(data_paths))
    ctx = RecordingContext(data_paths)
    path = run(MergeLoraConfig(loras="one.safetensors: 0.5, two.safetensors",
                               output_name="both", rank=3, save_precision="fp32"), ctx)
    state, meta = load_lora(path)
    assert {v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")} == {3}
    assert meta["ss_training_comment"] == "merged: one.safetensors x 0.5, two.safetensors x 1"
    assert "Merged one.safetensors x 0.5, two.safetensors x 1 into" in ctx.events[-1].message
    base, with_lora = demo_images_with_lora(data_paths, path)
    assert not np.allclose(base, with_lora)


def test_bad_merge_settings_are_named_and_nothing_is_replaced(data_paths):
    with pytest.raises(ConfigError, match="loras: name at least two"):
        MergeLoraConfig(loras="a.safetensors", output_name="x").validate()
    with pytest.raises(ConfigError, match="loras: 'half' is not a weight"):
        MergeLoraConfig(loras="a.safetensors: half, b.safetensors", output_name="x").validate()
    with pytest.raises(ConfigError, match="loras: .*path characters"):
        MergeLoraConfig(loras="../../etc/a.safetensors, b.safetensors", output_name="x").validate()
    with pytest.raises(ConfigError, match="output_name: choose a name other than"):
        MergeLoraConfig(loras="a.safetensors, b.safetensors", output_name="a").validate()
    with pytest.raises(ConfigError, match="loras: no file 'b.safetensors'"):
        save_lora(data_paths.lora / "a.safetensors", random_lora(2))
        check_before_queueing(MergeLoraConfig(loras="a.safetensors, b.safetensors",
                                              output_name="x").validate(), data_paths)
    save_lora(data_paths.lora / "b.safetensors", random_lora(2))
    save_lora(data_paths.lora / "taken.safetensors", random_lora(4))
    taken = (data_paths.lora / "taken.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="output_name: taken.safetensors exists .* 'Overwrite'"):
        check_before_queueing(MergeLoraConfig(loras="a.safetensors, b.safetensors",
                                              output_name="taken"), data_paths)
    with pytest.raises(FileExistsError, match="taken.safetensors exists"):
        run(MergeLoraConfig(loras="a.safetensors, b.safetensors", output_name="taken"),
            RecordingContext(data_paths))
    assert (data_paths.lora / "taken.safetensors").read_bytes() == taken
