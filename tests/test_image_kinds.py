"""Every awkward image kind opens as the same picture in the one opener and in every loader:
16-bit greyscale (I;16, I;16B, I) and 16-bit RGB as gradients, not white; CMYK in the right
colours; EXIF rotation applied; an animation's first frame; transparency over the background."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from core.images import ImageError, open_image
from tests.image_kinds import KINDS, TRANSPARENT, write_all
from trainers import kohya_data
from trainers.data import load_dataset, open_training_image

WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    return folder, write_all(folder)


@pytest.fixture(scope="module")
def vae():
    from trainers.tiny_model import build_components
    _, vae, _ = build_components(0)
    return vae.eval()


def as_rgb(pixels: torch.Tensor) -> np.ndarray:
    """A loader's [3, H, W] tensor in -1..1 back to H x W x 3 uint8."""
    return np.rint((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(int)


def assert_same(actual, expected, name, tolerance=1):
    actual, expected = np.asarray(actual, dtype=int), np.asarray(expected, dtype=int)
    assert actual.shape == expected.shape, f"{name}: {actual.shape} != {expected.shape}"
    worst = np.abs(actual - expected).max()
    assert worst <= tolerance, f"{name}: differs by up to {worst} from what it should be"


@pytest.mark.parametrize("name", sorted(KINDS))
def test_the_opener_gives_each_kind_upright_over_the_chosen_background(kinds, name):
    folder, expected = kinds
    green = (0, 128, 0)
    image = open_image(folder / name, background=green)
    assert image.mode == "RGB"
    assert_same(image, expected[name](green), name)


def test_sixteen_bit_is_a_gradient_not_white(kinds):
    folder, _ = kinds
    for name in ("deep16.png", "deep16b.tif", "int32.tif", "rgb16.png"):
        array = np.asarray(open_training_image(folder / name, keep_alpha=False), dtype=int)
        assert array.min() <= 1 and array.max() >= 254, name
        assert 100 < array.mean() < 155, name  # a naive convert("RGB") is almost all 255
        assert len(np.unique(array[..., 0])) >= 60, name


def test_alpha_modes_keep_rgba_and_drop(kinds):
    folder, expected = kinds
    kept = open_image(folder / "rgba.png", alpha="keep")
    assert kept.mode == "RGBA"
    assert (np.asarray(kept.getchannel("A"))[:, :32] == 0).all()
    assert open_image(folder / "anim.gif", alpha="keep").mode == "RGB"  # opaque: no alpha
    always = open_image(folder / "deep16.png", alpha="rgba")
    assert always.mode == "RGBA" and np.asarray(always.getchannel("A")).min() == 255
    assert_same(always.convert("RGB"), expected["deep16.png"](WHITE), "deep16.png as RGBA")
    dropped = np.asarray(open_image(folder / "rgba.png", alpha="drop"), dtype=int)
    assert (dropped[:, :32] == (0, 0, 255)).all()  # the colour stored under alpha 0
    with pytest.raises(ValueError, match="alpha: 'grey' is not one of"):
        open_image(folder / "rgba.png", alpha="grey")


def test_a_broken_file_raises_image_error_naming_why(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError, match="unreadable image .*Truncated"):
        open_image(tmp_path / "broken.png")
    (tmp_path / "text.jpg").write_text("plain text")
    with pytest.raises(ImageError, match="not an image"):
        open_training_image(tmp_path / "text.jpg", keep_alpha=False)


@pytest.mark.parametrize("use_weight", [False, True])
def test_textual_inversion_loader_reads_every_kind(kinds, vae, use_weight):
    folder, expected = kinds
    dataset = load_dataset(folder, vae, 64, 64, varsize=False, batch_size=1, seed=0,
                           latent_sampling="deterministic", use_weight=use_weight,
                           keep_pixels=True)
    loaded = {e.path.name: e for e in dataset.examples}
    assert sorted(loaded) == sorted(KINDS) and not dataset.skipped
    for name, example in loaded.items():
        if use_weight and name in TRANSPARENT:  # RGB under alpha is the file's; alpha weighs
            assert example.weight[0, :, :4].max() < example.weight[0, :, -4:].min(), name
            continue
        picture = Image.fromarray(expected[name](WHITE)).resize((64, 64), Image.BICUBIC)
        assert_same(as_rgb(example.pixels), picture, f"TI {name} (use_weight={use_weight})")


@pytest.mark.parametrize("alpha_mask", [False, True])
def test_kohya_loader_reads_every_kind(kinds, alpha_mask):
    folder, expected = kinds
    dataset = kohya_data.scan_dataset(kohya_data.folder_dataset(folder, resolution=64,
                                                                alpha_mask=alpha_mask))
    entries = {e.path.name: e for e in dataset.train_images}
    assert sorted(entries) == sorted(KINDS)
    subset = dataset.config.subsets[0]
    for name, entry in entries.items():
        upright = expected[name](WHITE)
        assert tuple(entry.size) == (upright.shape[1], upright.shape[0]), name  # EXIF swap
        assert entry.placement.resized == tuple(entry.size)  # no resampling to account for
        pixels, alpha = kohya_data._pixels(entry, subset)
        if alpha_mask and name in TRANSPARENT:
            assert alpha[:, :32].max() == 0 and alpha[:, 32:].min() == 1, name
            continue
        picture = np.asarray(Image.fromarray(upright).crop(entry.placement.crop))
        assert_same(as_rgb(pixels), picture, f"kohya {name} (alpha_mask={alpha_mask})")


def test_aesthetic_embedding_reads_every_kind(kinds):
    from trainers.aesthetic import ClipModels, image_embeddings
    folder, expected = kinds
    seen = []

    def processor(images, return_tensors):
        seen.extend(images)
        return {"pixel_values": torch.zeros(len(images), 3, 8, 8)}
    vision = lambda pixel_values: SimpleNamespace(image_embeds=torch.ones(len(pixel_values), 4))  # noqa: E731
    clip = ClipModels(vision=vision, full=None, processor=processor, folder=folder)
    names = sorted(KINDS)
    features = image_embeddings(clip, [folder / n for n in names], batch_size=4)
    assert features.shape == (len(names), 4)
    for name, picture in zip(names, seen):
        if name not in TRANSPARENT:  # the aesthetic extension drops alpha; see alpha_modes
            assert_same(picture, expected[name](WHITE), f"aesthetic {name}")


def test_dataset_editor_thumbnails_of_sixteen_bit_images_are_not_white(kinds, tmp_path):
    from webui.tab_preprocess import thumbnail
    folder, _ = kinds
    thumb = np.asarray(Image.open(thumbnail(folder / "deep16.png", tmp_path)), dtype=int)
    assert thumb.min() < 30 and 100 < thumb.mean() < 155  # the gradient, as JPEG
    rotated = Image.open(thumbnail(folder / "rotated.png", tmp_path))
    assert rotated.size[1] > rotated.size[0]  # upright: taller than wide
