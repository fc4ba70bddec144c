"""Robust image input: every awkward file a dataset folder may hold."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.images import ImageError, open_image
from tests.conftest import photo


def png_header_only(path, width, height):
    """A PNG whose header claims width x height (1-bit grey) with a token of pixel data."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    image = open_image(tmp_path / "rotated.jpg")
    assert image.size == (32, 64)
    array = np.asarray(image, dtype=int)
    # clockwise: the stored left (red) becomes the top
    assert array[:28, :, 0].mean() > 200 and array[:28, :, 2].mean() < 60
    assert array[36:, :, 2].mean() > 200 and array[36:, :, 0].mean() < 60


def test_cmyk_is_converted_to_matching_rgb(tmp_path):
    original = photo(1, 64)
    original.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = open_image(tmp_path / "cmyk.jpg")
    assert image.mode == "RGB"
    diff = np.abs(np.asarray(image, dtype=int) - np.asarray(original, dtype=int)).mean()
    assert diff < 12


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = open_image(tmp_path / "deep.png")
    assert image.mode == "RGB"
    row = np.asarray(image, dtype=int)[8, :, 0]
    expected = np.rint(ramp[8] / 257.0)
    assert np.abs(row - expected).max() <= 1  # a naive convert would make it mostly white


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 16, 32))  # left half: index 0, transparent
    image.save(tmp_path / "palette.png", transparency=0)
    out = np.asarray(open_image(tmp_path / "palette.png"), dtype=int)
    assert (out[:, :16] == 255).all()  # transparent black shows as white
    assert (out[:, 16:] == [255, 0, 0]).all()


def test_grey_with_alpha_composited_or_kept(tmp_path):
    grey = Image.new("L", (32, 32), 40)
    alpha = Image.new("L", (32, 32), 255)
    alpha.paste(0, (0, 0, 16, 32))
    Image.merge("LA", (grey, alpha)).save(tmp_path / "la.png")
    flat = np.asarray(open_image(tmp_path / "la.png"), dtype=int)
    assert flat.shape == (32, 32, 3)
    assert (flat[:, :16] == 255).all() and (flat[:, 16:] == 40).all()
    kept = open_image(tmp_path / "la.png", alpha="keep")
    assert kept.mode == "RGBA"
    assert np.array_equal(np.asarray(kept.getchannel("A")), np.asarray(alpha))


def test_opaque_alpha_is_dropped_even_when_kept(tmp_path):
    photo(0, 32).convert("RGBA").save(tmp_path / "opaque.png")
    assert open_image(tmp_path / "opaque.png", alpha="keep").mode == "RGB"


def test_animated_images_use_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    for name in ("anim.gif", "anim.webp"):
        assert Image.open(tmp_path / name).n_frames == 2
        out = np.asarray(open_image(tmp_path / name), dtype=int)
        assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50, name


def test_decompression_bomb_sizes_are_refused_with_a_message(tmp_path):
    huge = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageError, match="refused"):
        open_image(huge)
    # above our own limit but under Pillow's: our message names the size and the limit
    big = png_header_only(tmp_path / "big.png", 12_000, 9_000)
    with pytest.raises(ImageError, match=r"12000x9000.*108\.0 megapixels.*limit of 89\.5"):
        open_image(big)
    photo(0, 64).save(tmp_path / "small.png")
    with pytest.raises(ImageError, match="limit"):
        open_image(tmp_path / "small.png", max_pixels=1000)
    assert open_image(tmp_path / "small.png", max_pixels=64 * 64).size == (64, 64)


def test_corrupt_truncated_and_non_image_files_raise_image_error(tmp_path):
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "notes.png").write_text("not a picture")
    photo(2, 128).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("noise.jpg", "notes.png", "cut.png"):
        with pytest.raises(ImageError) as info:
            open_image(tmp_path / name)
        assert str(info.value)


def test_unicode_file_names(tmp_path):
    path = tmp_path / "猫 café-ü 🐱.png"
    photo(2, 40).save(path)
    assert open_image(path).size == (40, 40)
