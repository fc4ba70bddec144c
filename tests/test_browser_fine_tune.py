"""Native fine-tuning in the page with the demo model (headless Chromium): make the metadata
JSON from caption and tag files, a bad JSON path named, train a few steps, the checkpoint and
the .npz latents on disk."""
from __future__ import annotations

import json

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import photo
from tests.browser_page import fill, open_accordion, pick_method

pytestmark = pytest.mark.browser


def test_fine_tune_flow(page: Page, app_server, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        photo(i).save(images / f"{i}.png")
        (images / f"{i}.caption").write_text(f"a qzx picture {i}")
        (images / f"{i}.txt").write_text("outdoors, blue_sky")
    meta = tmp_path / "meta.json"
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "Fine-tune")
    fill(page, "FineTuneConfig-output_name", "browserft")
    fill(page, "FineTuneConfig-train_data_dir", str(images))
    fill(page, "FineTuneConfig-in_json", str(tmp_path / "nothing.json"))
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("in_json", timeout=30_000)
    expect(page.locator("#train-message")).to_contain_text("does not exist")
    fill(page, "FineTuneConfig-in_json", str(meta))
    page.locator("#finetune-make-json").click()
    expect(page.locator("#finetune-json-result")).to_contain_text("2 images", timeout=30_000)
    data = json.loads(meta.read_text())
    assert data["0"] == {"caption": "a qzx picture 0", "tags": "outdoors, blue sky"}
    open_accordion(page, "Dataset")
    fill(page, "FineTuneConfig-resolution", "64")
    fill(page, "FineTuneConfig-min_bucket_reso", "32")
    fill(page, "FineTuneConfig-bucket_reso_steps", "16")
    open_accordion(page, "Optimization")
    fill(page, "FineTuneConfig-max_train_steps", "3")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("finished at step 3", timeout=180_000)
    assert (app_server.data_dir / "models" / "Stable-diffusion" / "browserft.safetensors").exists()
    assert sorted(p.name for p in images.glob("*.npz")) == ["0.npz", "1.npz"]
