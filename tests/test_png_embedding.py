"""A1111's embedding-in-an-image: the tEXt chunk, and the pixel columns that outlive it."""
from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import photo
from trainers.formats.embedding import EmbeddingFile, EmbeddingFormatError, load_embedding
from trainers.formats.png_embedding import (TEXT_KEY, extract_pixel_data, lcg_bytes,
                                            read_png_embedding, save_png_embedding)


def sd1_embedding() -> EmbeddingFile:
    vectors = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))
    return EmbeddingFile(name="probe", vectors=vectors, step=7, sd_checkpoint="0123456789",
                         sd_checkpoint_name="base-model")


def sdxl_embedding() -> EmbeddingFile:
    generator = torch.Generator().manual_seed(1)
    return EmbeddingFile(name="xl", vectors={"clip_l": torch.randn(2, 768, generator=generator),
                                             "clip_g": torch.randn(2, 1280, generator=generator)})


def assert_same(loaded: EmbeddingFile, emb: EmbeddingFile) -> None:
    if isinstance(emb.vectors, dict):
        for key, tensor in emb.vectors.items():
            assert loaded.vectors[key].dtype == torch.float32
            assert torch.equal(loaded.vectors[key], tensor)
    else:
        assert loaded.vectors.dtype == torch.float32 and loaded.vectors.dim() == 2
        assert torch.equal(loaded.vectors, emb.vectors)


def pixels_only_copy(source, target) -> None:
    """Re-encode the image from its pixels alone, as an image host or editor would."""
    with Image.open(source) as image:
        Image.fromarray(np.asarray(image.convert("RGB"))).save(target)
    with Image.open(target) as image:
        assert TEXT_KEY not in image.text


def test_keystream_matches_a1111_reference_values():
    stream = lcg_bytes(100_100)
    assert stream[:12].tolist() == [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4]
    assert int(stream[100:].astype(np.int64).sum()) == 12731374


@pytest.mark.parametrize("make", [sd1_embedding, sdxl_embedding])
def test_text_chunk_round_trip(tmp_path, make):
    emb = make()
    path = tmp_path / "emb.png"
    save_png_embedding(path, photo(0), emb)
    loaded = read_png_embedding(path)
    assert_same(loaded, emb)
    if emb.is_sdxl:  # A1111 requires every entry of an SDXL dict to be a tensor
        assert loaded.name == "emb"
    else:
        assert (loaded.name, loaded.step, loaded.sd_checkpoint) == ("probe", 7, "0123456789")
    assert_same(load_embedding(path), emb)


def test_text_chunk_is_base64_json_with_torchtensor_lists(tmp_path):
    path = tmp_path / "emb.png"
    emb = sd1_embedding()
    save_png_embedding(path, photo(1), emb)
    with Image.open(path) as image:
        data = json.loads(base64.b64decode(image.text[TEXT_KEY]))
    assert data["string_to_token"] == {"*": 265}
    assert data["name"] == "probe" and data["step"] == 7
    assert data["sd_checkpoint_name"] == "base-model"
    assert torch.equal(torch.tensor(data["string_to_param"]["*"]["TORCHTENSOR"]), emb.vectors)


@pytest.mark.parametrize("make", [sd1_embedding, sdxl_embedding])
def test_pixels_alone_carry_the_embedding(tmp_path, make):
    emb = make()
    save_png_embedding(tmp_path / "emb.png", photo(2), emb, caption="<probe>")
    pixels_only_copy(tmp_path / "emb.png", tmp_path / "stripped.png")
    loaded = read_png_embedding(tmp_path / "stripped.png")
    assert_same(loaded, emb)
    if not emb.is_sdxl:
        assert (loaded.name, loaded.step) == ("probe", 7)


def test_lossless_webp_keeps_the_pixel_copy(tmp_path):
    emb = sd1_embedding()
    save_png_embedding(tmp_path / "emb.webp", photo(2), emb)
    loaded = load_embedding(tmp_path / "emb.webp")
    assert_same(loaded, emb)
    assert loaded.name == "probe"


def test_pixel_layout_is_a1111s(tmp_path):
    """[low nibbles | black | preview | black | high nibbles], rows of 3-channel pixels."""
    emb = sd1_embedding()
    preview = photo(3)
    save_png_embedding(tmp_path / "emb.png", preview, emb)
    with Image.open(tmp_path / "emb.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    height = preview.height
    payload = zlib.compress(json.dumps({
        "string_to_token": {"*": 265},
        "string_to_param": {"*": {"TORCHTENSOR": emb.vectors.tolist()}},
        "name": "probe", "step": 7, "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "base-model"}).encode(), level=9)
    size = len(payload) + (height - len(payload) % height)
    size += 3 * height - size % (3 * height)
    block = size // (3 * height)
    assert pixels.shape == (height, preview.width + 2 * block + 2, 3)
    assert not pixels[:, block].any() and not pixels[:, block + 1 + preview.width].any()
    assert np.array_equal(pixels[:, block + 1:block + 1 + preview.width], np.asarray(preview))

    key = lcg_bytes(size).reshape(height, block, 3) & 0x0F
    low = (pixels[:, :block] & 0x0F) ^ key
    high = (pixels[:, block + 2 + preview.width:] & 0x0F) ^ key
    data = ((high << 4) | low).astype(np.uint8).tobytes()
    assert data[:len(payload)] == payload
    assert zlib.decompressobj().decompress(data) == zlib.decompress(payload)


def test_caption_is_drawn_over_the_preview(tmp_path):
    preview = photo(5)
    save_png_embedding(tmp_path / "plain.png", preview, sd1_embedding())
    save_png_embedding(tmp_path / "captioned.png", preview, sd1_embedding(), caption="<probe>")
    with Image.open(tmp_path / "plain.png") as plain, \
            Image.open(tmp_path / "captioned.png") as captioned:
        assert plain.size == captioned.size
        assert not np.array_equal(np.asarray(plain), np.asarray(captioned))
    assert read_png_embedding(tmp_path / "captioned.png").name == "probe"


def test_images_without_an_embedding_are_refused(tmp_path):
    photo(0).save(tmp_path / "holiday.png")
    with pytest.raises(EmbeddingFormatError, match="holiday.png: no embedding"):
        read_png_embedding(tmp_path / "holiday.png")
    with Image.open(tmp_path / "holiday.png") as image:
        assert extract_pixel_data(image) is None
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(EmbeddingFormatError, match="broken.png"):
        load_embedding(tmp_path / "broken.png")


def test_lossy_reencode_is_reported_not_misread(tmp_path):
    save_png_embedding(tmp_path / "emb.png", photo(1), sd1_embedding())
    with Image.open(tmp_path / "emb.png") as image:
        image.convert("RGB").save(tmp_path / "emb.jpg.png", format="JPEG", quality=90)
    with pytest.raises(EmbeddingFormatError, match="no embedding"):
        read_png_embedding(tmp_path / "emb.jpg.png")
