"""Masked loss (kohya's masked_loss / alpha_mask): masks follow the images' resizes, crops,
flips and buckets, reach the latent size, zero the loss (and its gradient) where they are black,
are cached with the latents, and bad mask folders are refused by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import ConfigError
from tests.conftest import photo
from trainers.data import DatasetError, load_dataset
from trainers.kohya_data import folder_dataset, parse_dataset_toml, prepare_datasets
from trainers.step import diffusion_loss


@pytest.fixture(scope="module")
def vae():
    from trainers.tiny_model import build_components
    _, vae, _ = build_components(0)
    return vae.eval()


def _left_half_mask(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


def _images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        paths.append(folder / f"img{i}.png")
        photo(i, 64).resize(size).save(paths[-1])
    return paths


def _masks(folder: Path, sizes: list[tuple[int, int]], ext: str = "png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        _left_half_mask(size).save(folder / f"img{i}.{ext}")


class PixelUNet(torch.nn.Module):
    """A 1x1 convolution: each output element depends on its own latent position only, so a
    gradient reaching a latent element comes from the loss at that element."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def forward(self, x, t, context, **kwargs):
        return type("Out", (), {"sample": self.conv(x)})()


def _objective():
    from trainers.objectives import NoisePrediction
    return NoisePrediction({"num_train_timesteps": 1000, "prediction_type": "epsilon"})


def test_masked_out_pixels_give_no_gradient():
    torch.manual_seed(0)
    unet, latents = PixelUNet(), torch.randn(1, 4, 8, 8, requires_grad=True)
    weight = torch.zeros(1, 1, 8, 8)
    weight[..., :4] = 1.0  # the right half is masked out
    loss = diffusion_loss(unet, _objective(), latents, torch.zeros(1, 2, 8),
                          torch.Generator().manual_seed(1), weight=weight)
    loss.backward()
    assert latents.grad[..., 4:].abs().max() == 0
    assert latents.grad[..., :4].abs().min() > 0
    assert unet.conv.weight.grad.abs().sum() > 0
    # kohya's apply_masked_loss: the masked per-element loss is averaged, not renormalised
    unmasked = diffusion_loss(unet, _objective(), latents.detach(), torch.zeros(1, 2, 8),
                              torch.Generator().manual_seed(1), weight=torch.ones(1, 1, 8, 8))
    assert loss.item() < unmasked.item()


def test_mask_folder_follows_buckets_and_flips_cached_or_not(tmp_path, vae):
    sizes = [(64, 96), (96, 64)]  # two buckets
    train = tmp_path / "train" / "2_sks"
    _images(train, sizes)
    _masks(tmp_path / "masks" / "2_sks", sizes)
    options = dict(resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                   bucket_reso_steps=32, batch_size=1, flip_aug=True)
    seen = {}
    for disk in (False, True):
        config = folder_dataset(tmp_path / "train", mask_dir=tmp_path / "masks", **options)
        assert config.subsets[0].conditioning_data_dir == tmp_path / "masks" / "2_sks"
        batches = prepare_datasets(config, vae, cache_to_disk=disk)
        for micro in range(batches.batches_per_epoch):
            batch = batches.batch(micro)
            epoch, within, _, keys = batches.plan(micro)
            weight = batch.weights[0, 0]
            assert weight.shape == batch.latents.shape[-2:]
            h, w = weight.shape
            left, right = weight[:, : w // 2], weight[:, (w + 1) // 2:]
            # the bucket's centre crop keeps the left half white; a flipped sample's mask is
            # mirrored with its latent
            flipped = left.mean() < right.mean()
            white, black = (right, left) if flipped else (left, right)
            assert torch.allclose(white, torch.ones_like(white))
            assert torch.allclose(black, torch.zeros_like(black))
            seen.setdefault(micro, []).append((batch.latents, batch.weights))
        if disk:
            with np.load(train / "img0.npz") as npz:
                assert "mask" in npz.files and "alpha_mask" not in npz.files
    for memory, cached in seen.values():  # the disk cache gives the in-memory batches
        assert torch.allclose(memory[0], cached[0], atol=1e-6)
        assert torch.equal(memory[1], cached[1])


def test_toml_mask_folder_only_with_masked_loss(tmp_path, vae):
    _images(tmp_path / "img", [(64, 64)])
    _masks(tmp_path / "mask", [(64, 64)])
    toml = ('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "img"\n'
            'conditioning_data_dir = "mask"\n')
    with pytest.raises(ConfigError, match="conditioning_data_dir.*masked_loss"):
        parse_dataset_toml(toml, tmp_path)
    (config,) = parse_dataset_toml(toml, tmp_path, masked_loss=True)
    assert config.subsets[0].conditioning_data_dir == tmp_path / "mask"
    weight = prepare_datasets(config, vae).batch(0).weights[0, 0]
    assert weight[:, :4].min() == 1 and weight[:, 4:].max() == 0
    with pytest.raises(ConfigError, match="alpha_mask"):
        parse_dataset_toml(toml + "alpha_mask = true\n", tmp_path, masked_loss=True)


@pytest.mark.parametrize("problem,match", [
    ("missing", "no mask in .* for 1 image.*img1.png"),
    ("extra", "1 mask.* belong to no training image: stray.png"),
    ("size", "mask .*img0.png is 32x32, its image (img0.png )?is 64x64"),
])
def test_bad_mask_folders_are_refused_by_name(tmp_path, vae, problem, match):
    _images(tmp_path / "train", [(64, 64), (64, 64)])
    _masks(tmp_path / "masks", [(64, 64), (64, 64)])
    if problem == "missing":
        (tmp_path / "masks" / "img1.png").unlink()
    elif problem == "extra":
        _left_half_mask((64, 64)).save(tmp_path / "masks" / "stray.png")
    else:
        _left_half_mask((32, 32)).save(tmp_path / "masks" / "img0.png")
    config = folder_dataset(tmp_path / "train", mask_dir=tmp_path / "masks", resolution=64)
    with pytest.raises(DatasetError, match=f"conditioning_data_dir: (mask )?{match}"):
        prepare_datasets(config, vae)
    with pytest.raises(DatasetError, match=f"conditioning_data_dir: (mask )?{match}"):
        load_dataset(tmp_path / "train", vae, 64, 64, varsize=False, batch_size=1, seed=0,
                     latent_sampling="deterministic", use_weight=False,
                     mask_dir=tmp_path / "masks")


def test_template_dataset_masks_and_alpha(tmp_path, vae):
    """The A1111-style datasets (TI, hypernetwork, APT, XTI): masks resized with the image to
    the training size, area-averaged to the latent size, values 0..1, not renormalised."""
    _images(tmp_path / "train", [(128, 96)])
    _masks(tmp_path / "masks", [(128, 96)])
    data = load_dataset(tmp_path / "train", vae, 64, 64, varsize=False, batch_size=1, seed=0,
                        latent_sampling="deterministic", use_weight=False,
                        mask_dir=tmp_path / "masks")
    weight = data.weights([0])[0, 0]
    assert weight.shape == (8, 8) and weight.min() >= 0 and weight.max() <= 1
    assert torch.allclose(weight[:, :3], torch.ones(8, 3), atol=1e-3)
    assert torch.allclose(weight[:, 5:], torch.zeros(8, 3), atol=1e-3)
    image = photo(0, 64).convert("RGBA")
    image.putalpha(_left_half_mask((64, 64)))
    (tmp_path / "alpha").mkdir()
    image.save(tmp_path / "alpha" / "a.png")
    data = load_dataset(tmp_path / "alpha", vae, 64, 64, varsize=True, batch_size=1, seed=0,
                        latent_sampling="deterministic", use_weight=False, alpha_mask=True)
    weight = data.weights([0])[0, 0]
    assert torch.equal(weight[:, :4], torch.ones(8, 4))
    assert torch.equal(weight[:, 4:], torch.zeros(8, 4))


def test_config_problems_name_the_fields():
    from trainers.configs import LoraConfig, TextualInversionConfig
    base = dict(model="tiny-demo", output_name="x", train_data_dir="d")
    with pytest.raises(ConfigError, match="conditioning_data_dir: masked_loss needs a mask"):
        LoraConfig(**base, masked_loss=True).validate()
    with pytest.raises(ConfigError, match="alpha_mask: masks come from"):
        LoraConfig(**base, masked_loss=True, alpha_mask=True,
                   conditioning_data_dir="m").validate()
    with pytest.raises(ConfigError, match="conditioning_data_dir: the mask folder is read"):
        LoraConfig(**base, conditioning_data_dir="m").validate()
    with pytest.raises(ConfigError, match="use_weight"):
        TextualInversionConfig(model="tiny-demo", data_root="d", embedding="e", use_weight=True,
                               alpha_mask=True).validate()
    LoraConfig(**base, masked_loss=True, conditioning_data_dir="m").validate()
