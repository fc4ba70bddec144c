"""The aesthetic-gradients extension's other generation options: "aesthetic text for imgs"
(mixed into the target by a slerp angle, or steered away from) and "slerp interpolation" of the
steered conditioning."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.test_aesthetic import full_clip, images, make, pixels, preview_config  # noqa: F401
from trainers.aesthetic import (SteeredEncoder, Steering, load_aesthetic_embedding, load_clip,
                                preview_from_config, slerp)
from trainers.models import load_model
from trainers.prompts import PromptEncoder


def test_slerp_endpoints_and_the_arc():
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g) * 2
    assert torch.allclose(slerp(low, high, 0.0), low, atol=1e-5)  # angle 0: no change
    assert torch.allclose(slerp(low, high, 1.0), high, atol=1e-5)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    half = slerp(a, b, 0.5)  # on the circle, not the chord
    assert torch.allclose(half, torch.tensor([[1.0, 1.0]]) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(slerp(a, b, 1 / 3), torch.tensor([[math.cos(math.pi / 6),
                                                           math.sin(math.pi / 6)]]), atol=1e-6)
    same = slerp(a, a * 3, 0.25)  # no angle between them: the linear mix, never NaN
    assert torch.allclose(same, torch.tensor([[1.5, 0.0]]))


def test_slerp_of_a_conditioning_runs_along_the_token_axis():
    """As in the extension: for [batch, tokens, width] each width channel's column of token
    values is one vector."""
    g = torch.Generator().manual_seed(1)
    z, zn = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mixed = slerp(z, zn, 0.3)
    for batch in range(2):
        for channel in range(4):
            one = slerp(z[batch, :, channel][None], zn[batch, :, channel][None], 0.3)[0]
            assert torch.allclose(mixed[batch, :, channel], one, atol=1e-5)


@pytest.fixture
def steering(data_paths, images, full_clip):
    make(data_paths, images, full_clip)
    model = load_model(data_paths, "tiny-demo")
    base = PromptEncoder(model.tokenizer, model.text_encoder)
    clip = load_clip(full_clip)
    embedding = load_aesthetic_embedding(data_paths.aesthetic_embeddings / "look.pt")

    def encoder(**options):
        return SteeredEncoder(base, clip, Steering(embedding, **{"steps": 2, "lr": 0.05,
                                                                 **options}))
    return encoder, embedding, clip, model


def test_aesthetic_text_changes_the_target(steering):
    encoder, embedding, clip, model = steering
    assert torch.equal(encoder().target(), embedding)
    assert torch.allclose(encoder(text="a red car", slerp_angle=0.0).target(), embedding, atol=1e-6)
    ids = torch.tensor([model.tokenizer("a red car", padding="max_length", max_length=77,
                                        truncation=True).input_ids])
    with torch.no_grad():
        text = clip.full.get_text_features(input_ids=ids)
        text = getattr(text, "pooler_output", text)
    assert torch.allclose(encoder(text="a red car", slerp_angle=1.0).target(), text, atol=1e-5)
    toward = encoder(text="a red car", slerp_angle=0.5).target()
    assert not torch.allclose(toward, embedding, atol=1e-3)
    away = encoder(text="a red car", slerp_angle=1.0, text_negative=True).target()
    expected = (embedding - text) / (embedding - text).norm()
    assert torch.allclose(away, expected, atol=1e-5)

    # the steered conditioning follows the target: angle 0 is the same as no text
    prompt = ["a photo of a cat"]
    plain = encoder().encode(prompt)
    assert torch.allclose(encoder(text="a red car", slerp_angle=0.0).encode(prompt), plain,
                          atol=1e-5)
    assert not torch.allclose(encoder(text="a red car", slerp_angle=0.8).encode(prompt), plain,
                              atol=1e-4)


def test_slerp_mix_of_the_steered_conditioning(steering):
    encoder, *_ = steering
    prompt = ["a photo of a cat"]
    z = encoder(weight=0.0).encode(prompt)  # no weight: the prompt as it is
    steered = encoder(weight=1.0).encode(prompt)
    assert torch.allclose(encoder(weight=1.0, slerp=True).encode(prompt), steered, atol=1e-5)
    linear = encoder(weight=0.5).encode(prompt)
    spherical = encoder(weight=0.5, slerp=True).encode(prompt)
    assert torch.allclose(spherical, slerp(z, steered, 0.5), atol=1e-5)
    assert not torch.allclose(spherical, linear, atol=1e-4)


def test_preview_with_the_options_and_bad_values(data_paths, images, full_clip):
    make(data_paths, images, full_clip)
    plain, steered, cost = preview_from_config(preview_config(
        aesthetic_text="a red car", aesthetic_slerp=True, aesthetic_slerp_angle=0.5), data_paths)
    assert ", slerp, toward text 'a red car' at angle 0.5" in cost
    with_options = pixels(steered)
    _, linear, _ = preview_from_config(preview_config(), data_paths)
    assert np.abs(with_options - pixels(linear)).max() > 1
    assert linear != steered and steered.is_file() and plain.is_file()  # the first kept
    assert np.array_equal(pixels(steered), with_options)
    with pytest.raises(ConfigError, match="aesthetic_slerp_angle"):
        preview_config(aesthetic_slerp_angle=1.5).validate()
