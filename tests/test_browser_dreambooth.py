"""DreamBooth in the page with the demo model (headless Chromium)."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import photo
from tests.browser_page import fill, open_accordion, pick_method

pytestmark = pytest.mark.browser


def test_dreambooth_flow(page: Page, app_server, tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir()
    for i in range(2):
        photo(i).save(instance / f"{i}.png")
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "DreamBooth")
    fill(page, "DreamBoothConfig-output_name", "browserdb")
    fill(page, "DreamBoothConfig-train_data_dir", str(instance))
    fill(page, "DreamBoothConfig-instance_prompt", "a photo of zxq dog")
    fill(page, "DreamBoothConfig-num_class_images", "2")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("class_data_dir", timeout=30_000)
    fill(page, "DreamBoothConfig-class_data_dir", str(tmp_path / "class"))
    fill(page, "DreamBoothConfig-class_prompt", "a photo of a dog")
    open_accordion(page, "Dataset")
    fill(page, "DreamBoothConfig-resolution", "64")
    fill(page, "DreamBoothConfig-min_bucket_reso", "32")
    fill(page, "DreamBoothConfig-bucket_reso_steps", "16")
    page.locator("#train-memory").click()
    expect(page.locator("#train-message")).to_contain_text("Estimated peak memory", timeout=30_000)
    open_accordion(page, "Samples and saving")
    fill(page, "DreamBoothConfig-sample_every_n_steps", "2")
    fill(page, "DreamBoothConfig-sample_prompts", "a photo of zxq dog --s 2 --w 64 --h 64")
    open_accordion(page, "Optimization")
    fill(page, "DreamBoothConfig-max_train_steps", "4")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("finished at step 4", timeout=180_000)
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=30_000)
    assert (app_server.data_dir / "models" / "Stable-diffusion" / "browserdb.safetensors").exists()
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
