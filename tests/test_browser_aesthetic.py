"""The aesthetic-embedding flow in the page with the demo model (headless Chromium): create the
embedding from a folder with a tiny local CLIP model, refuse an existing name, preview a prompt
with and without steering, see the cost; again with an aesthetic text and slerp mixing."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import photo
from tests.browser_page import fill

pytestmark = pytest.mark.browser


def tiny_clip(folder, tiny_model_dir):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig
    text = CLIPTextConfig.from_pretrained(tiny_model_dir / "text_encoder").to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    torch.manual_seed(1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def test_aesthetic_embedding_flow(page: Page, app_server, tmp_path, tiny_model_dir):
    tiny_clip(app_server.data_dir / "models" / "CLIP" / "tiny", tiny_model_dir)
    look = tmp_path / "look"
    look.mkdir()
    for i in range(3):
        photo(i).save(look / f"{i}.png")
    page.goto(app_server.url)
    page.get_by_role("tab", name="Aesthetic embedding").click()
    fill(page, "aesthetic-name", "mylook")
    fill(page, "aesthetic-data_root", str(look))
    fill(page, "aesthetic-clip_model", "models/CLIP/tiny")
    page.locator("#aesthetic-create").click()
    expect(page.locator("#aesthetic-message")).to_contain_text("Created", timeout=60_000)
    assert (app_server.data_dir / "models" / "aesthetic_embeddings" / "mylook.pt").is_file()
    page.locator("#aesthetic-create").click()
    expect(page.locator("#aesthetic-message")).to_contain_text("already exists", timeout=30_000)
    fill(page, "aesthetic-preview-clip_model", "models/CLIP/tiny")
    fill(page, "aesthetic-preview-prompt", "a photo of a cat")
    fill(page, "aesthetic-preview-aesthetic_steps", "3")
    fill(page, "aesthetic-preview-aesthetic_lr", "0.05")
    fill(page, "aesthetic-preview-steps", "2")
    fill(page, "aesthetic-preview-width", "64")
    fill(page, "aesthetic-preview-height", "64")
    page.locator("#aesthetic-preview").click()
    expect(page.locator("#aesthetic-cost")).to_contain_text("Aesthetic steering: 3 steps", timeout=120_000)
    expect(page.locator("#aesthetic-images img")).to_have_count(2, timeout=30_000)
    assert len(list((app_server.data_dir / "outputs" / "aesthetic").glob("mylook-*.png"))) == 2

    # the extension's other options: an aesthetic text mixed in by the slerp angle, slerp mixing
    fill(page, "aesthetic-preview-aesthetic_text", "a red car")
    page.locator("#aesthetic-preview-aesthetic_slerp input[type=checkbox]").check()
    page.locator("#aesthetic-preview").click()
    expect(page.locator("#aesthetic-cost")).to_contain_text(
        "slerp, toward text 'a red car' at angle 0.1", timeout=120_000)
