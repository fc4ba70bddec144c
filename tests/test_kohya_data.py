"""kohya datasets: repeats folders, dataset TOML, captions, buckets, latent caches, batches."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import photo
from trainers.data import DatasetError
from trainers.kohya_data import (KohyaBatches, SubsetConfig, bucket_info, cache_latents,
                                 dataset_dirs_info, folder_dataset, parse_dataset_toml,
                                 parse_folder_name, prepare_datasets, process_caption,
                                 scan_dataset, tag_frequency)


@pytest.fixture(scope="module")
def vae():
    from trainers.tiny_model import build_components
    _, vae, _ = build_components(0)
    return vae.eval()


class CountingVAE:
    """Wraps a VAE and counts encode calls."""

    def __init__(self, vae):
        self.vae, self.calls = vae, 0
        self.config, self.device, self.dtype = vae.config, vae.device, vae.dtype

    def encode(self, pixels):
        self.calls += 1
        return self.vae.encode(pixels)


def _folder(root: Path, name: str, sizes: list[tuple[int, int]], captions: dict | None = None,
            start: int = 0) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        photo(start + i, 64).resize(size).save(folder / f"img{i}.png")
    for stem, text in (captions or {}).items():
        (folder / f"{stem}.txt").write_text(text)
    return folder


# ----------------------------------------------------------------------------- folder names

@pytest.mark.parametrize("name,expected", [
    ("20_sks dog", (20, "sks dog")), ("3_x", (3, "x")), ("10_a_b c", (10, "a_b c")),
    ("1_", (1, ""))])
def test_folder_names(name, expected):
    assert parse_folder_name(name) == expected


@pytest.mark.parametrize("name", ["dog", "x_20", "_dog", "0_dog", "20dog", "20 dog", ""])
def test_bad_folder_names(name):
    with pytest.raises(ValueError):
        parse_folder_name(name)


def test_folder_dataset_reads_repeats_and_class_tokens(tmp_path):
    train = tmp_path / "train"
    _folder(train, "20_sks dog", [(64, 64), (64, 64)], {"img0": "a photo of sks dog, sitting"})
    _folder(train, "3_x", [(64, 64)])
    (train / "notes").mkdir()  # not a repeats folder: ignored with a note, as kohya does
    config = folder_dataset(train, resolution=64, batch_size=2, shuffle_caption=True)
    assert [(s.image_dir.name, s.num_repeats, s.class_tokens, s.shuffle_caption)
            for s in config.subsets] == [("20_sks dog", 20, "sks dog", True), ("3_x", 3, "x", True)]
    assert config.resolution == (64, 64) and config.batch_size == 2
    assert any("notes" in note for note in config.notes)
    dataset = scan_dataset(config)
    captions = {(e.path.parent.name, e.path.name): e.caption for e in dataset.train_images}
    assert captions == {("20_sks dog", "img0.png"): "a photo of sks dog, sitting",
                        ("20_sks dog", "img1.png"): "sks dog", ("3_x", "img0.png"): "x"}
    assert dataset.num_train_images == 2 * 20 + 3


def test_a_repeats_folder_without_images_is_an_error(tmp_path):
    train = tmp_path / "train"
    _folder(train, "20_sks dog", [(64, 64)])
    empty = train / "5_empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="5_empty"):
        scan_dataset(folder_dataset(train, resolution=64))


def test_a_training_folder_without_repeats_folders_is_an_error(tmp_path):
    (tmp_path / "train" / "dog").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train_data_dir"):
        folder_dataset(tmp_path / "train")


def test_folder_options_are_checked(tmp_path):
    _folder(tmp_path / "train", "2_x", [(64, 64)])
    with pytest.raises(ConfigError, match="shuffle_captions"):
        folder_dataset(tmp_path / "train", shuffle_captions=True)
    with pytest.raises(ConfigError, match="keep_tokens"):
        folder_dataset(tmp_path / "train", keep_tokens="1")


def test_unreadable_images_are_skipped_and_empty_caption_files_refused(tmp_path):
    folder = _folder(tmp_path / "train", "2_x", [(64, 64)])
    (folder / "broken.png").write_bytes(b"not a png")
    dataset = scan_dataset(folder_dataset(tmp_path / "train", resolution=64))
    assert [e.path.name for e in dataset.train_images] == ["img0.png"]
    assert any("broken.png" in note for note in dataset.notes)
    (folder / "img0.txt").write_text("")
    with pytest.raises(DatasetError, match="img0.txt is empty"):
        scan_dataset(folder_dataset(tmp_path / "train", resolution=64))


# ----------------------------------------------------------------------------- TOML

GOOD_TOML = """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = [64, 96]
batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16

  [[datasets.subsets]]
  image_dir = "imgs"
  num_repeats = 10
  class_tokens = "sks dog"
  flip_aug = true
  caption_dropout_rate = 0.1

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "dog"
  keep_tokens = 0

[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "/abs/other"
"""


def test_toml_happy_path(tmp_path):
    first, second = parse_dataset_toml(GOOD_TOML, tmp_path)
    assert first.resolution == (64, 96) and first.batch_size == 2 and first.enable_bucket
    assert (first.min_bucket_reso, first.max_bucket_reso, first.bucket_reso_steps) == (32, 128, 16)
    imgs, reg = first.subsets
    assert imgs.image_dir == tmp_path / "imgs"  # relative to the TOML's folder
    assert (imgs.num_repeats, imgs.class_tokens, imgs.flip_aug, imgs.is_reg) == (10, "sks dog", True, False)
    assert imgs.shuffle_caption and imgs.keep_tokens == 1  # from [general]
    assert imgs.caption_dropout_rate == 0.1
    assert reg.is_reg and reg.keep_tokens == 0 and reg.num_repeats == 1
    assert second.resolution == (64, 64) and second.subsets[0].image_dir == Path("/abs/other")
    assert second.batch_size == 1 and not second.enable_bucket


@pytest.mark.parametrize("toml,key,table", [
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeat = 3\n',
     "num_repeat", "[[datasets.subsets]] #1 of [[datasets]] #1"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = "20"\n',
     "num_repeats", "[[datasets.subsets]] #1 of [[datasets]] #1"),
    ('[general]\nshufle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n',
     "shufle_caption", "[general]"),
    ('[[datasets]]\nbatch_size = 1.5\n[[datasets.subsets]]\nimage_dir = "a"\n',
     "batch_size", "[[datasets]] #1"),
    ('[[datasets]]\nenable_bucket = "yes"\n[[datasets.subsets]]\nimage_dir = "a"\n',
     "enable_bucket", "[[datasets]] #1"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets.subsets]]\nflip_aug = 1\n'
     'image_dir = "b"\n', "flip_aug", "[[datasets.subsets]] #2 of [[datasets]] #1"),
    ('[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n', "image_dir",
     "[[datasets.subsets]] #1 of [[datasets]] #1"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\ncolor_aug = true\n', "color_aug",
     "[[datasets.subsets]] #1 of [[datasets]] #1"),
    ('[[datasets]]\nresolution = [64]\n[[datasets.subsets]]\nimage_dir = "a"\n', "resolution",
     "[[datasets]] #1"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\ncaption_dropout_rate = 2.0\n',
     "caption_dropout_rate", "[[datasets.subsets]] #1 of [[datasets]] #1"),
])
def test_toml_errors_name_the_key_and_its_table(tmp_path, toml, key, table):
    with pytest.raises(ConfigError) as caught:
        parse_dataset_toml(toml, tmp_path)
    message = str(caught.value)
    assert key in message and table in message, message


def test_toml_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'num_repeats'"):
        parse_dataset_toml('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
                           'num_repeat = 3\n', tmp_path)


def test_toml_syntax_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_dataset_toml("[[datasets]\n", tmp_path)


# ----------------------------------------------------------------------------- captions

TAGS = "sks dog, red collar, grass, sunny, park, running"


def test_keep_tokens_with_shuffle_keeps_the_first_tags():
    subset = SubsetConfig(Path("."), shuffle_caption=True, keep_tokens=2)
    results = set()
    for i in range(40):
        tags = process_caption(subset, TAGS, random.Random(i)).split(", ")
        assert tags[:2] == ["sks dog", "red collar"]
        assert sorted(tags[2:]) == sorted(["grass", "sunny", "park", "running"])
        results.add(tuple(tags))
    assert len(results) > 5  # the rest really is shuffled


def test_keep_tokens_separator():
    subset = SubsetConfig(Path("."), shuffle_caption=True, keep_tokens_separator="|||")
    for i in range(20):
        text = process_caption(subset, "sks, dog ||| a, b, c ||| masterpiece", random.Random(i))
        tags = text.split(", ")
        assert tags[:2] == ["sks", "dog"] and tags[-1] == "masterpiece"
        assert sorted(tags[2:-1]) == ["a", "b", "c"]


def test_caption_dropout_rate_one_gives_an_empty_caption():
    subset = SubsetConfig(Path("."), caption_dropout_rate=1.0, shuffle_caption=True)
    assert all(process_caption(subset, TAGS, random.Random(i)) == "" for i in range(10))
    every = SubsetConfig(Path("."), caption_dropout_every_n_epochs=3)
    assert [process_caption(every, TAGS, random.Random(0), epoch) == "" for epoch in
            range(1, 7)] == [False, False, True, False, False, True]


def test_tag_dropout():
    everything = SubsetConfig(Path("."), caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption(everything, TAGS, random.Random(0)) == "sks dog"
    half = SubsetConfig(Path("."), caption_tag_dropout_rate=0.5, keep_tokens=1)
    lengths = set()
    for i in range(40):
        tags = process_caption(half, TAGS, random.Random(i)).split(", ")
        assert tags[0] == "sks dog"
        rest = TAGS.split(", ")[1:]
        assert tags[1:] == [t for t in rest if t in tags[1:]]  # order kept without shuffle
        lengths.add(len(tags))
    assert len(lengths) > 2


def test_no_shuffle_keeps_the_caption_and_prefix_suffix_apply():
    subset = SubsetConfig(Path("."), caption_prefix="masterpiece,", caption_suffix=", 4k")
    assert process_caption(subset, "a  b,c\nsecond line", random.Random(0)) == \
        "masterpiece, a  b,c"
    wild = SubsetConfig(Path("."), enable_wildcard=True)
    assert process_caption(wild, "a {red|red} {{dog}}", random.Random(0)) == "a red {dog}"


# ----------------------------------------------------------------------------- latents & batches

@pytest.fixture
def bucket_dataset(tmp_path):
    train = tmp_path / "train"
    _folder(train, "3_sks dog", [(64, 64), (96, 64), (64, 96), (64, 64)],
            {"img0": "sks dog, red collar, grass", "img1": "sks dog, sofa"})
    _folder(train, "2_cat", [(96, 64), (64, 64)], start=2)
    return folder_dataset(train, resolution=64, batch_size=2, enable_bucket=True,
                          min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                          shuffle_caption=True, keep_tokens=1, flip_aug=True)


def test_epoch_covers_every_image_times_repeats_in_single_bucket_batches(bucket_dataset, vae):
    batches = prepare_datasets(bucket_dataset, vae, seed=1)
    dataset = batches.datasets[0]
    assert len({e.placement.bucket for e in dataset.entries}) == 3  # square, wide, tall
    for epoch in range(2):
        seen = Counter()
        for within in range(batches.batches_per_epoch):
            micro = epoch * batches.batches_per_epoch + within
            _, _, _, keys = batches.plan(micro)
            assert len({dataset.entries[k].placement.bucket for k in keys}) == 1
            seen.update(keys)
            batch = batches.batch(micro)
            bw, bh = dataset.entries[keys[0]].placement.bucket
            assert batch.latents.shape == (len(keys), 4, bh // 8, bw // 8)
            assert len(batch.texts) == len(keys) and batch.weights is None
        assert seen == {k: e.repeats for k, e in enumerate(dataset.entries)}
        assert sum(seen.values()) == 4 * 3 + 2 * 2


def test_batch_is_a_pure_function_of_seed_and_step(bucket_dataset, vae):
    dataset = scan_dataset(bucket_dataset)
    cache_latents(dataset, vae, seed=0)
    first, again = KohyaBatches(dataset, seed=7), KohyaBatches(dataset, seed=7)
    other = KohyaBatches(dataset, seed=8)
    n = first.batches_per_epoch
    for micro in [n + 3, 0, 2 * n + 1, 5]:  # out of order: no hidden state
        a, b = first.batch(micro), again.batch(micro)
        assert torch.equal(a.latents, b.latents) and a.texts == b.texts
    ours = [first.batch(m) for m in range(n)]
    theirs = [other.batch(m) for m in range(n)]
    assert [b.texts for b in ours] != [b.texts for b in theirs]
    next_epoch = [first.batch(n + m).texts for m in range(n)]
    assert next_epoch != [b.texts for b in ours]


def test_latents_are_scaled_and_flipped_ones_are_the_mirror_encoding(tmp_path, vae):
    train = tmp_path / "train"
    _folder(train, "50_sks", [(64, 64)])
    dataset = scan_dataset(folder_dataset(train, resolution=64, flip_aug=True))
    cache_latents(dataset, vae, seed=0)
    entry = dataset.entries[0]
    assert entry.latents.shape == (4, 8, 8) and entry.latents_flipped is not None
    assert not torch.allclose(entry.latents, entry.latents_flipped)
    batches = KohyaBatches(dataset, seed=0, scaling_factor=vae.config.scaling_factor)
    seen = set()
    for micro in range(50):
        latent = batches.batch(micro).latents[0]
        if torch.allclose(latent, entry.latents * vae.config.scaling_factor):
            seen.add("plain")
        elif torch.allclose(latent, entry.latents_flipped * vae.config.scaling_factor):
            seen.add("flipped")
    assert seen == {"plain", "flipped"}


def test_disk_cache_writes_npz_and_reuses_it(bucket_dataset, vae):
    counting = CountingVAE(vae)
    first = scan_dataset(bucket_dataset)
    encoded = cache_latents(first, counting, seed=0, cache_to_disk=True)
    assert encoded == 6 and counting.calls > 0
    npz_path = first.entries[1].path.with_suffix(".npz")
    assert npz_path.is_file()
    with np.load(npz_path) as npz:
        assert {"latents", "original_size", "crop_ltrb", "latents_flipped"} <= set(npz.files)
        bw, bh = first.entries[1].placement.bucket
        assert npz["latents"].shape == (4, bh // 8, bw // 8)
        assert npz["latents_flipped"].shape == npz["latents"].shape
        assert npz["original_size"].tolist() == list(first.entries[1].size)
        assert len(npz["crop_ltrb"]) == 4
        stored = torch.from_numpy(npz["latents"])

    counting.calls = 0
    second = scan_dataset(bucket_dataset)
    assert cache_latents(second, counting, seed=0, cache_to_disk=True) == 0
    assert counting.calls == 0  # every image came from its .npz
    batches = KohyaBatches(second, seed=0, scaling_factor=0.5)
    latents = []
    for micro in range(batches.batches_per_epoch):
        _, _, _, keys = batches.plan(micro)
        for row, key in enumerate(keys):
            if second.entries[key].path == first.entries[1].path:
                latents.append(batches.batch(micro).latents[row])
    assert latents and any(torch.allclose(latent, stored * 0.5) for latent in latents)

    # a different bucket size makes the cache stale: it is encoded again
    counting.calls = 0
    bigger = folder_dataset(bucket_dataset.subsets[0].image_dir.parent, resolution=128,
                            enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256,
                            bucket_reso_steps=16, flip_aug=True)
    assert cache_latents(scan_dataset(bigger), counting, seed=0, cache_to_disk=True) == 6
    assert counting.calls > 0


def test_the_same_images_skip_the_vae_in_the_next_run_with_the_same_vae(bucket_dataset, vae,
                                                                         monkeypatch):
    import copy
    import os
    fresh_vae = copy.deepcopy(vae)  # another VAE object: nothing kept for it
    calls = []
    real = vae.encode
    monkeypatch.setattr(vae, "encode", lambda pixels: calls.append(len(pixels)) or real(pixels))

    def latents(dataset):
        return [(e.latents, e.latents_flipped) for e in dataset.entries]

    first = scan_dataset(bucket_dataset)
    assert cache_latents(first, vae, seed=0) == 6 and sum(calls) == 12  # and the mirror images
    calls.clear()
    second = scan_dataset(bucket_dataset)
    assert cache_latents(second, vae, seed=0) == 0 and calls == []
    for (a, fa), (b, fb) in zip(latents(first), latents(second)):
        assert torch.equal(a, b) and torch.equal(fa, fb)

    # another seed samples other latents from the kept distributions, exactly as encoding would
    reseeded, encoded = scan_dataset(bucket_dataset), scan_dataset(bucket_dataset)
    assert cache_latents(reseeded, vae, seed=3) == 0 and calls == []
    assert cache_latents(encoded, fresh_vae, seed=3) == 6
    for (a, fa), (b, fb) in zip(latents(reseeded), latents(encoded)):
        assert torch.equal(a, b) and torch.equal(fa, fb)
    assert not torch.equal(latents(reseeded)[0][0], latents(first)[0][0])

    # a changed image is encoded again, and only that one
    changed = first.entries[0].path
    photo(5, 64).save(changed)
    stamp = os.stat(changed).st_mtime_ns + 10**9
    os.utime(changed, ns=(stamp, stamp))
    assert cache_latents(scan_dataset(bucket_dataset), vae, seed=0) == 1

    # changed weights (in place) make everything kept stale
    with torch.no_grad():
        next(vae.parameters()).mul_(1.0)
    assert cache_latents(scan_dataset(bucket_dataset), vae, seed=0) == 6
    # several images per VAE call are not reused (a batch may round differently)
    calls.clear()
    assert cache_latents(scan_dataset(bucket_dataset), vae, seed=0, vae_batch_size=2) == 6
    assert calls


def test_regularization_images_are_kept_apart_balanced_and_weighted(tmp_path, vae):
    train, reg = tmp_path / "train", tmp_path / "reg"
    _folder(train, "3_sks dog", [(64, 64), (64, 64)])
    _folder(reg, "1_dog", [(64, 64)] * 4, start=2)
    dataset = scan_dataset(folder_dataset(train, reg, resolution=64, batch_size=2))
    assert len(dataset.train_images) == 2 and len(dataset.reg_images) == 4
    assert all(e.is_reg for e in dataset.reg_images)
    assert dataset.num_train_images == 6 and dataset.num_reg_images == 4
    # kohya: one pass with their repeats (4), then one more each in turn until 6
    assert [e.repeats for e in dataset.reg_images] == [2, 2, 1, 1]
    cache_latents(dataset, vae)
    batches = KohyaBatches(dataset, seed=0, prior_loss_weight=0.5)
    assert batches.batches_per_epoch == 6  # 12 images with repeats, 2 per batch
    weights = []
    for micro in range(batches.batches_per_epoch):
        batch = batches.batch(micro)
        _, _, _, keys = batches.plan(micro)
        expected = [0.5 if dataset.entries[k].is_reg else 1.0 for k in keys]
        if batch.weights is None:
            assert expected == [1.0] * len(keys)
        else:
            assert batch.weights.flatten().tolist() == expected
        weights += expected
    assert Counter(weights) == {1.0: 6, 0.5: 6}


def test_alpha_mask_becomes_the_loss_weight(tmp_path, vae):
    from PIL import Image
    folder = tmp_path / "train" / "2_sks"
    folder.mkdir(parents=True)
    image = photo(0, 64).convert("RGBA")
    alpha = Image.new("L", (64, 64), 0)
    alpha.paste(255, (0, 0, 32, 64))  # left half opaque
    image.putalpha(alpha)
    image.save(folder / "a.png")
    toml = ('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n'
            f'image_dir = "{folder}"\nnum_repeats = 2\nalpha_mask = true\n')
    (config,) = parse_dataset_toml(toml, tmp_path)
    batches = prepare_datasets(config, vae, cache_to_disk=True)
    with np.load(folder / "a.npz") as npz:
        assert npz["alpha_mask"].shape == (64, 64)
    weight = batches.batch(0).weights
    assert weight.shape == (1, 1, 8, 8)
    assert torch.allclose(weight[0, 0, :, :4], torch.ones(8, 4))
    assert torch.allclose(weight[0, 0, :, 4:], torch.zeros(8, 4))


def test_metadata_tag_frequency_dirs_and_buckets(bucket_dataset):
    dataset = scan_dataset(bucket_dataset)
    frequency = tag_frequency(dataset)
    assert frequency["3_sks dog"]["sks dog"] == 4  # two captions + two class-token fallbacks
    assert frequency["3_sks dog"]["sofa"] == 1 and frequency["2_cat"] == {"cat": 2}
    assert dataset_dirs_info(dataset) == {"3_sks dog": {"n_repeats": 3, "img_count": 4},
                                          "2_cat": {"n_repeats": 2, "img_count": 2}}
    assert dataset_dirs_info(dataset, is_reg=True) == {}
    info = bucket_info(dataset)
    assert sum(b["count"] for b in info["buckets"].values()) == 16
