"""Aesthetic embeddings (A1111's aesthetic-gradients extension) with tiny CLIP models built here
in the real layout: the file is the normalized mean CLIP image embedding, steering changes the
render, bad input is named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import photo
from trainers.aesthetic import (AestheticError, create_aesthetic_embedding, load_clip,
                                preview_from_config)
from trainers.configs import AestheticEmbeddingConfig, AestheticPreviewConfig
from trainers.formats.safe_load import safe_torch_load
from trainers.models import load_model

IMAGE_SIZE = 32


def vision_config():
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8,
                            projection_dim=16)


def save_processor(folder):
    from transformers import CLIPImageProcessor
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)


@pytest.fixture
def vision_clip(tmp_path):
    """A CLIPVisionModelWithProjection with random weights, saved as the real one is."""
    from transformers import CLIPVisionModelWithProjection
    torch.manual_seed(0)
    folder = tmp_path / "clip-vision"
    CLIPVisionModelWithProjection(vision_config()).save_pretrained(folder)
    save_processor(folder)
    return folder


@pytest.fixture
def full_clip(tmp_path, data_paths):
    """A CLIPModel whose text tower has the demo text encoder's shape (as ViT-L/14 has SD1's)."""
    from transformers import CLIPConfig, CLIPModel
    text = load_model(data_paths, "tiny-demo").text_encoder.config.to_dict()
    config = CLIPConfig(text_config=text, vision_config=vision_config().to_dict(), projection_dim=16)
    torch.manual_seed(1)
    folder = data_paths.data_dir / "models" / "CLIP" / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    save_processor(folder)
    return folder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "look"
    folder.mkdir()
    for i in range(3):
        photo(i, 48 + 8 * i).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def make(data_paths, images, clip, **changes):
    cfg = AestheticEmbeddingConfig(**{"name": "look", "data_root": str(images),
                                      "clip_model": str(clip), "batch_size": 2, **changes})
    return create_aesthetic_embedding(cfg, data_paths)


def test_embedding_is_the_normalized_mean_of_the_clip_image_embeddings(data_paths, images, vision_clip):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    path = make(data_paths, images, vision_clip)
    assert path == data_paths.data_dir / "models" / "aesthetic_embeddings" / "look.pt"
    saved = torch.load(path)  # a plain tensor, as the extension torch.loads it
    assert torch.equal(saved, safe_torch_load(path)) and saved.dtype == torch.float32
    assert tuple(saved.shape) == (1, 16)
    with open(path, "rb") as handle:
        assert not handle.read(2) == b"PK"  # legacy serialization: A1111's safe loader accepts it
    model = CLIPVisionModelWithProjection.from_pretrained(vision_clip)
    processor = CLIPImageProcessor.from_pretrained(vision_clip)
    pictures = [Image.open(images / f"{i}.png").convert("RGB") for i in range(3)]
    with torch.no_grad():
        each = model(pixel_values=processor(images=pictures, return_tensors="pt")["pixel_values"]).image_embeds
    mean = each.mean(dim=0, keepdim=True)
    assert torch.allclose(saved, mean / mean.norm(), atol=1e-5)
    assert torch.isclose(saved.norm(), torch.tensor(1.0))
    assert not torch.allclose(saved, each[:1] / each[:1].norm(), atol=1e-3)  # all images count


def test_existing_name_bad_folder_and_bad_model_are_named(data_paths, images, vision_clip, tmp_path):
    make(data_paths, images, vision_clip)
    before = (data_paths.aesthetic_embeddings / "look.pt").read_bytes()
    with pytest.raises(AestheticError, match="name: look.pt already exists"):
        make(data_paths, images, vision_clip)
    assert (data_paths.aesthetic_embeddings / "look.pt").read_bytes() == before
    make(data_paths, images, vision_clip, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AestheticError, match="data_root: .* has no images"):
        make(data_paths, empty, vision_clip, name="other")
    with pytest.raises(AestheticError, match="clip_model: .*no config.json"):
        make(data_paths, images, tmp_path, name="other")
    with pytest.raises(ConfigError, match="name"):
        make(data_paths, images, vision_clip, name="../x")
    (vision_clip / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(AestheticError, match="clip_model: could not load"):
        make(data_paths, images, vision_clip, name="other")


def preview_config(**changes):
    base = dict(model="tiny-demo", aesthetic_embedding="look", clip_model="models/CLIP/tiny-clip",
                prompt="a photo of a cat", aesthetic_steps=3, aesthetic_lr=0.05,
                aesthetic_weight=0.9, seed=4, steps=2, width=64, height=64)
    base.update(changes)
    return AestheticPreviewConfig(**base)


def pixels(path):
    from PIL import Image
    return np.asarray(Image.open(path), dtype=np.float32)


def test_steering_changes_the_render_and_reports_its_cost(data_paths, images, full_clip):
    make(data_paths, images, full_clip)
    plain, steered, cost = preview_from_config(preview_config(), data_paths)
    assert np.abs(pixels(plain) - pixels(steered)).max() > 1
    assert "Aesthetic steering: 3 steps" in cost and "cost" in cost and " s " in cost
    plain2, steered2, _ = preview_from_config(preview_config(aesthetic_steps=0), data_paths)
    assert np.array_equal(pixels(plain2), pixels(steered2))  # no steps: nothing changes
    assert np.array_equal(pixels(plain), pixels(plain2))  # the plain render uses the same seed


def test_steering_bad_input(data_paths, images, vision_clip, full_clip):
    with pytest.raises(AestheticError, match="aesthetic_embedding: no look.pt"):
        preview_from_config(preview_config(), data_paths)
    make(data_paths, images, vision_clip)
    with pytest.raises(AestheticError, match="clip_model: steering needs the CLIP text tower"):
        preview_from_config(preview_config(clip_model=str(vision_clip)), data_paths)
    clip = load_clip(full_clip)
    assert clip.full is not None
    with pytest.raises(ConfigError, match="aesthetic_embedding: required"):
        preview_from_config(preview_config(aesthetic_embedding=""), data_paths)
