"""Native fine-tuning (kohya's fine_tune mode) on the tiny model: the metadata JSON (merge,
clean, checks), latents cached to .npz and read back, training from the JSON's captions
through the engine and the CLI, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.events import Preview, Status
from tests.conftest import ROOT, RecordingContext, photo
from tests.test_textual_inversion import module_digest
from trainers.configs import FineTuneConfig
from trainers.finetune_metadata import (MetadataError, clean_caption, clean_tags, load_metadata,
                                        make_metadata)
from trainers.methods import fine_tune
from trainers.models import load_model


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 96)]):
        photo(i, 96).resize((w, h)).save(folder / f"img{i}.png")
    return folder


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def metadata_json(tmp_path, images):
    return write_json(tmp_path / "meta.json", {
        f"img{i}": {"caption": f"qzx painting number {i}", "tags": f"tag{i}, outdoors"}
        for i in range(3)})


def ft_config(images, in_json, **changes):
    base = dict(model="tiny-demo", output_name="myft", train_data_dir=str(images),
                in_json=str(in_json), resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                bucket_reso_steps=16, max_train_steps=3, learning_rate=1e-3,
                sample_at_first=False, save_precision="fp32", seed=5)
    base.update(changes)
    return FineTuneConfig(**base).validate()


# ---------------------------------------------------------------- the metadata JSON

def test_merge_captions_and_tags_into_a_json_updates_it_and_cleans(tmp_path, images):
    (images / "img0.caption").write_text("a  girl girl in a field\n")
    (images / "img0.txt").write_text("1girl, long_hair, shirt, white_shirt, ^_^, rating:safe")
    (images / "img1.txt").write_text("red_car, car")
    out = write_json(tmp_path / "meta.json", {"img1": {"caption": "old"},
                                               "gone": {"caption": "kept as it was"}})
    report = make_metadata(images, out)
    data = json.loads(out.read_text())
    assert data["img0"] == {"caption": "a girl in a field",
                            "tags": "1girl, long hair, white shirt, ^_^"}
    assert data["img1"] == {"caption": "old", "tags": "red car"}
    assert data["gone"] == {"caption": "kept as it was"}
    assert data["img2"] == {}  # neither file: trains with an empty caption, and says so
    assert (report.images, report.captions, report.tags, report.added, report.without_text) == (3, 1, 2, 2, 1)
    make_metadata(images, out, clean=False)
    assert json.loads(out.read_text())["img0"]["tags"].startswith("1girl, long_hair")


def test_cleaning_rules():
    assert clean_tags("a_b, a_b, rating:explicit, ,x") == "a b, x"
    assert clean_tags("hat, red hat, >_<") == "red hat, >_<"
    assert clean_caption("the the  cat sat") == "the cat sat"


def test_metadata_cli(tmp_path, images):
    (images / "img0.caption").write_text("from the cli")
    from trainers.finetune_metadata import main
    assert main([str(images), str(tmp_path / "m.json")]) == 0
    assert load_metadata(tmp_path / "m.json")["img0"]["caption"] == "from the cli"
    assert main([str(tmp_path / "nope"), str(tmp_path / "m.json")]) == 2


@pytest.mark.parametrize("data, words", [
    ([1, 2], "must be an object"),
    ({}, "has no images"),
    ({"img0": {"captoin": "x"}}, "'img0' has an unknown key 'captoin'"),
    ({"img0": {"caption": 3}}, "'img0' caption must be a string"),
    ({"img0": {"train_resolution": [64]}}, "train_resolution must be"),
    ({"img0": "just text"}, "'img0' must be an object"),
])
def test_bad_metadata_is_named(tmp_path, data, words):
    with pytest.raises(MetadataError, match=words):
        load_metadata(write_json(tmp_path / "bad.json", data))


# ---------------------------------------------------------------- dataset and latents

class NoEncodeVae(torch.nn.Module):
    """The demo VAE's config, but encoding fails: proves latents come from the .npz files."""

    def __init__(self, vae):
        super().__init__()
        self.config = vae.config
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode(self, *args, **kwargs):
        raise AssertionError("the VAE was asked to encode an image")


def test_latents_are_cached_to_npz_and_read_back_without_the_vae(data_paths, images, metadata_json):
    from trainers import finetune_data
    model = load_model(data_paths, "tiny-demo")
    cfg = ft_config(images, metadata_json)
    config = fine_tune.dataset_config(cfg, images)
    meta = load_metadata(metadata_json)
    batches, encoded = finetune_data.prepare(config, meta, model.vae, cfg.seed)
    assert encoded == 3
    npz = {p.stem: np.load(p) for p in images.glob("*.npz")}
    assert sorted(npz) == ["img0", "img1", "img2"]
    shape = tuple(npz["img1"]["latents"].shape)
    assert shape == (4, 6, 10)  # 96x64 lands in the 80x48 bucket (area budget 64x64)
    assert set(npz["img1"].files) >= {"latents", "original_size", "crop_ltrb"}
    # mark one cache file: the batch must carry exactly its values
    marked = np.full(shape, 0.5, dtype=np.float32)
    np.savez(images / "img1.npz", latents=marked, original_size=npz["img1"]["original_size"],
             crop_ltrb=npz["img1"]["crop_ltrb"])
    again, encoded = finetune_data.prepare(config, meta, NoEncodeVae(model.vae), cfg.seed)
    assert encoded == 0
    seen = {}
    for micro in range(again.batches_per_epoch):
        batch = again.batch(micro)
        for text, latent in zip(batch.texts, batch.latents):
            seen[text] = latent
    assert sorted(seen) == sorted(f"qzx painting number {i}, tag{i}, outdoors" for i in range(3))
    scale = model.vae.config.scaling_factor
    assert torch.allclose(seen["qzx painting number 1, tag1, outdoors"], torch.full(shape, 0.5 * scale))


def test_train_resolution_in_the_json_fixes_the_buckets(data_paths, images, tmp_path):
    from trainers.finetune_data import scan_metadata
    meta = {f"img{i}": {"caption": "x", "train_resolution": [48, 48]} for i in range(3)}
    cfg = ft_config(images, write_json(tmp_path / "m.json", meta))
    dataset = scan_metadata(fine_tune.dataset_config(cfg, images), meta)
    assert {e.placement.bucket for e in dataset.entries} == {(48, 48)}


# ---------------------------------------------------------------- training

def test_fine_tune_trains_from_the_json_and_reuses_the_npz(data_paths, images, metadata_json):
    base = load_model(data_paths, "tiny-demo")
    digests = {n: module_digest(getattr(base, n)) for n in ("unet", "vae", "text_encoder")}
    ctx = RecordingContext(data_paths)
    path = fine_tune.run(ft_config(images, metadata_json, sample_every_n_steps=3,
                                   train_text_encoder=True), ctx)
    assert path == data_paths.stable_diffusion / "myft.safetensors"
    assert any("3 encoded, 0 latents read" in e.text for e in ctx.of(Status))
    # previews default to the last batch's caption: the JSON's caption + tags
    assert "qzx painting number" in ctx.of(Preview)[-1].caption
    tuned = load_model(data_paths, "myft.safetensors")
    assert module_digest(tuned.unet) != digests["unet"]
    assert module_digest(tuned.text_encoder) != digests["text_encoder"]
    assert module_digest(tuned.vae) == digests["vae"]
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["danlu.method"] == "fine_tune"
    again = RecordingContext(data_paths)
    fine_tune.run(ft_config(images, metadata_json, output_name="second"), again)
    assert any("0 encoded, 3 latents read from .npz" in e.text for e in again.of(Status))


def test_sidecar_keeps_only_what_trained_and_a_resume_repeats_the_run(data_paths, images,
                                                                       metadata_json):
    """Saved in fp16 with the text encoder training: the .optim holds the fp32 U-Net and text
    encoder (not the VAE), and an interrupted run resumed from it is the uninterrupted one."""
    from safetensors.torch import load_file
    from tests.conftest import repeat_with_interruption
    from trainers.formats.safe_load import safe_torch_load
    cfg = ft_config(images, metadata_json, max_train_steps=4, save_precision="fp16",
                    train_text_encoder=True)

    def kept(path):
        weights = safe_torch_load(path.with_name(path.name + ".optim"))["danlu"]["weights"]
        assert set(weights) == {"unet", "text_encoder"}

    def reset():
        for leftover in data_paths.stable_diffusion.iterdir():
            leftover.unlink()
    _, _, second = repeat_with_interruption(fine_tune.run, cfg, data_paths, load=load_file,
                                            reset=reset, after_first=kept)
    assert any("exact fp32 weights of step 2" in e.text for e in second.of(Status))
    assert any(e.text == "Loading model tiny-demo" for e in second.of(Status))


def test_cli_trains_fine_tune(tmp_path, tiny_model_dir, images, metadata_json):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / ".cache" / "tiny-demo")
    config = tmp_path / "run.toml"
    config.write_text(f'model = "tiny-demo"\noutput_name = "cliFT"\ntrain_data_dir = "{images}"\n'
                      f'in_json = "{metadata_json}"\nresolution = 64\nmin_bucket_reso = 32\n'
                      'bucket_reso_steps = 16\nmax_train_steps = 2\nsample_at_first = false\n')
    out = subprocess.run([sys.executable, "-m", "trainers", "fine_tune", "--config", str(config),
                          "--data-dir", str(data)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "finished at step 2" in out.stderr
    assert (data / "models" / "Stable-diffusion" / "cliFT.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "trainers", "fine_tune", "--config", str(config),
                          "--set", f"in_json={tmp_path / 'missing.json'}", "--data-dir", str(data)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "in_json" in bad.stderr and "missing.json" in bad.stderr


def test_bad_input_is_named_before_the_model_loads(data_paths, images, metadata_json, tmp_path):
    ctx = RecordingContext(data_paths)
    with pytest.raises(ConfigError, match="in_json: .*missing.json does not exist"):
        fine_tune.run(ft_config(images, tmp_path / "missing.json"), ctx)
    listed = write_json(tmp_path / "more.json", {"img0": {"caption": "x"}, "ghost": {"caption": "y"}})
    with pytest.raises(ConfigError, match="1 listed image.*not found.*'ghost'"):
        fine_tune.run(ft_config(images, listed), ctx)
    wrong = write_json(tmp_path / "wrong.json", {"img0": {"caption": "x", "size": 3}})
    with pytest.raises(ConfigError, match="'img0' has an unknown key 'size'"):
        fine_tune.run(ft_config(images, wrong), ctx)
    assert not ctx.of(Status)  # nothing was loaded
    with pytest.raises(ConfigError, match="in_json: choose"):
        ft_config(images, "")
    with pytest.raises(ConfigError, match="reg_data_dir"):
        ft_config(images, metadata_json, reg_data_dir=str(images))
    assert not list(images.glob("*.npz"))
