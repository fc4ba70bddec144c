"""The optional diffusers/peft copy of a trained LoRA: key names, load_lora_weights from the folder,
the same output as the kohya file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import RecordingContext
from tests.test_lora_training import kohya_folder, lora_config  # noqa: F401 (fixture)
from trainers.formats.lora import load_lora
from trainers.formats.lora_diffusers import WEIGHT_NAME, save_diffusers_lora
from trainers.lora_network import lora_names
from trainers.methods.lora import run


def pipeline(data_paths):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(data_paths.cache / "tiny-demo", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe):
    return pipe("zxq cat", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_diffusers_folder_loads_and_matches_the_kohya_file(data_paths, kohya_folder):  # noqa: F811
    cfg = lora_config(kohya_folder, max_train_steps=3, learning_rate=2e-2, network_alpha=1.0,
                      network_dim=4, conv_dim=2, conv_alpha=4.0, save_diffusers_format=True)
    path = run(cfg, RecordingContext(data_paths))
    folder = data_paths.lora / "mylora-diffusers"
    with safe_open(str(folder / WEIGHT_NAME), framework="pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata() == {"format": "pt"}
    kohya_state, _ = load_lora(path)
    assert len(keys) == 2 * len(lora_names(kohya_state))
    assert all(k.startswith(("unet.", "text_encoder.")) and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in keys  # LoCon

    pipe = pipeline(data_paths)
    base = image(pipe)
    pipe.load_lora_weights(str(path))
    from_kohya = image(pipe)
    pipe = pipeline(data_paths)
    pipe.load_lora_weights(str(folder))
    from_folder = image(pipe)
    assert not np.allclose(base, from_folder, atol=1e-3)
    assert np.allclose(from_kohya, from_folder, atol=1e-5)
    # both parts were loaded from the folder: the text encoder carries adapters too
    assert any("lora_A" in n for n, _ in pipe.text_encoder.named_parameters())


def test_without_the_option_no_folder_is_written(data_paths, kohya_folder):  # noqa: F811
    run(lora_config(kohya_folder, max_train_steps=1), RecordingContext(data_paths))
    assert not (data_paths.lora / "mylora-diffusers").exists()


def test_a_file_where_the_folder_goes_is_refused(tmp_path):
    blocker = tmp_path / "x-diffusers"
    blocker.write_text("mine")
    with pytest.raises(ValueError, match="not a folder"):
        save_diffusers_lora(blocker, {}, [])
    assert blocker.read_text() == "mine"
