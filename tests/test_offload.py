"""Offloading after caching (#19 item 3): what leaves the device is decided from the settings;
during the steps the parked text encoders and VAE are never run (their outputs come from the
caches), previews and cache misses bring them back, the run ends with them home, and the
losses are those of a run that keeps everything on the device."""
from __future__ import annotations

import pytest
import torch

from core.events import Preview
from tests.conftest import RecordingContext, kohya_photos
from tests.test_dreambooth import db_config
from tests.test_lora_training import lora_config
from trainers import kohya_training as kt
from trainers.offload import Offloader, leaving_device


def test_what_leaves_the_device():
    assert leaving_device(latents_cached=True, text_outputs_cached=True,
                          trains_text_encoder=False) == ["vae", "text_encoder", "text_encoder_2"]
    assert leaving_device(latents_cached=True, text_outputs_cached=True,
                          trains_text_encoder=True) == ["vae"]
    assert leaving_device(latents_cached=True, text_outputs_cached=False,
                          trains_text_encoder=False) == ["vae"]
    assert leaving_device(latents_cached=False, text_outputs_cached=False,
                          trains_text_encoder=False) == []


def test_the_config_decides_whether_text_outputs_are_cached():
    from trainers.configs import LoraConfig
    assert LoraConfig(cache_text_encoder_outputs=True).text_outputs_cached(False)
    assert not LoraConfig(cache_text_encoder_outputs=True).text_outputs_cached(True)
    assert not LoraConfig(cache_text_encoder_outputs=True,
                          shuffle_caption=True).text_outputs_cached(False)
    assert not LoraConfig().text_outputs_cached(False)


class _Watch:
    """Records, for each run of a text encoder or the VAE, whether it was parked then."""

    def __init__(self, monkeypatch, enabled: bool = True):
        self.offloaders, self.calls = [], []
        original = kt.offloader

        def spy(cfg, model, trains_te):
            offload = original(cfg, model, trains_te)
            if not enabled:
                offload = Offloader(model, [])
            self.offloaders.append(offload)
            for name in ("text_encoder", "vae"):
                module = getattr(model, name)
                self.handles.append(module.register_forward_pre_hook(
                    lambda *_, name=name: self.calls.append(
                        (name, offload.away and name in offload.names))))
                if name == "vae":
                    self.handles.append(module.decoder.register_forward_pre_hook(
                        lambda *_: self.calls.append(
                        ("vae", offload.away and "vae" in offload.names))))
            return offload
        self.handles = []
        monkeypatch.setattr(kt, "offloader", spy)

    def close(self):
        for handle in self.handles:
            handle.remove()


def test_parked_encoders_are_not_run_during_the_steps_and_previews_bring_them_back(
        data_paths, tmp_path, monkeypatch):
    from trainers.methods.lora import run
    folder = kohya_photos(tmp_path / "train")
    cfg = lora_config(folder, max_train_steps=4, network_train_unet_only=True,
                      cache_text_encoder_outputs=True, sample_every_n_steps=2,
                      sample_prompts="zxq cat --w 64 --h 64 --s 2 --d 3")
    watch = _Watch(monkeypatch)
    ctx = RecordingContext(data_paths)
    try:
        run(cfg, ctx)
    finally:
        watch.close()
    offload = watch.offloaders[0]
    assert offload.names == ["vae", "text_encoder"]  # the demo has one text encoder
    assert not offload.away  # home after the run (the base model is cached between jobs)
    assert [p.step for p in ctx.of(Preview)] == [2, 4]
    parked_runs = [name for name, away in watch.calls if away]
    assert parked_runs == []  # nothing parked ever ran: previews visited, captions precached
    assert ("text_encoder", False) in watch.calls and ("vae", False) in watch.calls

    # the same run with nothing offloaded: the same losses, bit for bit
    plain = _Watch(monkeypatch, enabled=False)
    again = RecordingContext(data_paths)
    try:
        run(lora_config(folder, max_train_steps=4, network_train_unet_only=True,
                        cache_text_encoder_outputs=True, sample_every_n_steps=2, overwrite=True,
                        sample_prompts="zxq cat --w 64 --h 64 --s 2 --d 3"), again)
    finally:
        plain.close()
    assert plain.offloaders[0].names == []
    assert again.losses == ctx.losses


def test_a_caption_missing_from_the_cache_visits_the_device(data_paths, tmp_path, monkeypatch):
    """Resuming mid-epoch or a caption first seen later: the encoder comes back for it."""
    from trainers.configs import LoraConfig
    from trainers.models import load_model
    model = load_model(data_paths, "tiny-demo")
    offload = Offloader(model, ["text_encoder"])
    seen = []
    handle = model.text_encoder.register_forward_pre_hook(lambda *_: seen.append(offload.away))
    try:
        _, encode = kt.encoder_for(LoraConfig(cache_text_encoder_outputs=True), model, False,
                                   visit=offload.visiting)
        with offload.parked():
            first = encode(["a cat"])
            again = encode(["a cat"])
    finally:
        handle.remove()
    assert seen == [False]  # encoded once, visiting, then from the memo
    assert torch.equal(first, again)


def test_dreambooth_parks_the_vae_and_keeps_a_training_text_encoder(data_paths, tmp_path,
                                                                      monkeypatch):
    from trainers.methods.dreambooth import run
    watch = _Watch(monkeypatch)
    folder = tmp_path / "instance"
    folder.mkdir()
    from tests.conftest import photo
    photo(0).save(folder / "0.png")
    try:
        run(db_config(folder, max_train_steps=2, train_text_encoder=True,
                      cache_text_encoder_outputs=True), RecordingContext(data_paths))
    finally:
        watch.close()
    assert watch.offloaders[0].names == ["vae"]
    assert ("text_encoder", False) in watch.calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moves between CUDA and the CPU")
def test_offloaded_modules_go_to_the_cpu_and_back():
    from types import SimpleNamespace
    model = SimpleNamespace(vae=torch.nn.Linear(4, 4).cuda(), text_encoder=None)
    offload = Offloader(model, ["vae", "text_encoder"])
    with offload.parked():
        assert offload.where() == {"vae": torch.device("cpu")}
        with offload.visiting():
            assert model.vae.weight.is_cuda
        assert not model.vae.weight.is_cuda
    assert model.vae.weight.is_cuda
