"""Base-model discovery and loading: demo, diffusers folders, single files (offline), bad files."""
from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from core.paths import Paths
from tests.test_formats_sd_checkpoint import tiny_sd_components, write_config_folder
from trainers import models
from trainers.formats.sd_checkpoint import save_single_file


@pytest.fixture
def single_file(tmp_path, monkeypatch):
    """models/Stable-diffusion/small.safetensors in the original SD1 layout, and its config."""
    paths = Paths(tmp_path / "data").ensure()
    unet, vae, text_encoder = tiny_sd_components("sd1")
    skeleton = write_config_folder(tmp_path / "skeleton", unet, vae, text_encoder)
    monkeypatch.setattr(models, "config_skeleton", lambda paths, family="sd1": skeleton)
    path = paths.stable_diffusion / "small.safetensors"
    save_single_file(path, unet, vae, text_encoder, dtype=torch.float32)
    return paths, path, unet


def test_listing_offers_files_folders_and_the_demo(tmp_path):
    paths = Paths(tmp_path).ensure()
    (paths.stable_diffusion / "b.safetensors").write_bytes(b"")
    (paths.stable_diffusion / "a.ckpt").write_bytes(b"")
    (paths.stable_diffusion / "notes.txt").write_text("")
    (paths.stable_diffusion / "folder").mkdir()
    (paths.stable_diffusion / "folder" / "model_index.json").write_text("{}")
    (paths.stable_diffusion / "empty-folder").mkdir()
    assert models.list_models(paths) == ["a.ckpt", "b.safetensors", "folder", "tiny-demo",
                                        "tiny-demo-sd2", "tiny-demo-sdxl", "tiny-demo-flux",
                                        "tiny-demo-zimage", "tiny-demo-chroma",
                                        "tiny-demo-flux2", "tiny-demo-qwenimage"]


def test_single_safetensors_loads_offline_with_the_config_skeleton(single_file):
    paths, path, unet = single_file
    model = models.load_model(paths, "small.safetensors")
    for name, tensor in unet.state_dict().items():
        assert torch.allclose(model.unet.state_dict()[name], tensor, atol=1e-6), name
    assert model.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert models.load_model(paths, "small.safetensors") is model  # cached


def test_ckpt_goes_through_the_restricted_loader(single_file, tmp_path):
    paths, path, _ = single_file
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    bad = paths.stable_diffusion / "evil.ckpt"
    with open(bad, "wb") as handle:
        pickle.dump({"state_dict": Evil()}, handle)
    with pytest.raises(models.ModelError, match="evil.ckpt"):
        models.load_model(paths, "evil.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("name, words", [
    ("", "choose a base model"),
    ("missing.safetensors", "was not found"),
    ("../outside", "was not found"),
])
def test_bad_model_names(tmp_path, name, words):
    with pytest.raises(models.ModelError, match=words):
        models.load_model(Paths(tmp_path).ensure(), name)


def test_folder_without_model_index_is_not_a_model(tmp_path):
    paths = Paths(tmp_path).ensure()
    (paths.stable_diffusion / "junk").mkdir()
    with pytest.raises(models.ModelError, match="model_index.json"):
        models.load_model(paths, "junk")


def test_corrupt_single_file_gives_a_clear_error(tmp_path):
    paths = Paths(tmp_path).ensure()
    (paths.stable_diffusion / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(models.ModelError, match="could not load 'broken.safetensors'"):
        models.load_model(paths, "broken.safetensors")


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_an_exclusive_job_gives_back_what_it_did_not_change(single_file, data_paths, layout):
    paths, name = single_file[:2] if layout == "file" else (data_paths, "tiny-demo")
    name = name.name if layout == "file" else name
    model = models.load_model(paths, name, exclusive=True)
    pristine = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with torch.no_grad():  # what DreamBooth does to the U-Net and the text encoder
        for module in (model.unet, model.text_encoder):
            next(module.parameters()).add_(1.0)
    models.give_back(model, {"unet", "text_encoder"})
    again = models.load_model(paths, name)
    assert again.vae is model.vae and again.tokenizer is model.tokenizer  # reused
    assert again.unet is not model.unet and again.text_encoder is not model.text_encoder
    for key, tensor in again.unet.state_dict().items():  # read again from disk
        assert torch.allclose(tensor, pristine[key], atol=1e-6), key
    assert not next(again.vae.parameters()).requires_grad
    assert models.load_model(paths, name) is again  # a whole model is cached again


def test_nothing_is_given_back_after_another_model_was_loaded(single_file, data_paths):
    paths, path, _ = single_file
    model = models.load_model(paths, path.name, exclusive=True)
    other = models.load_model(paths, "tiny-demo")  # the one model in memory now
    models.give_back(model, {"unet"})
    assert models.load_model(paths, "tiny-demo") is other
    again = models.load_model(paths, path.name)
    assert again.vae is not model.vae
