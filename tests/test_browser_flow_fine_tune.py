"""DreamBooth of a flow model's whole transformer in the page (headless Chromium), on the Chroma
demo: training the text encoder is refused by name, the Flow matching section sets the sigma
sampling, the run previews through ChromaPipeline and writes Chroma's transformer file."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser_page import choose, fill, open_accordion, pick_method
from tests.conftest import kohya_photos

pytestmark = pytest.mark.browser


def test_chroma_dreambooth_from_the_page(page: Page, app_server, tmp_path):
    kohya_photos(tmp_path / "train")
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "DreamBooth")
    choose(page, "DreamBoothConfig-model", "tiny-demo-chroma (built-in Chroma demo, random weights)")
    fill(page, "DreamBoothConfig-output_name", "pagechroma")
    fill(page, "DreamBoothConfig-train_data_dir", str(tmp_path / "train"))
    open_accordion(page, "Dataset")
    fill(page, "DreamBoothConfig-resolution", "64")
    fill(page, "DreamBoothConfig-min_bucket_reso", "32")
    fill(page, "DreamBoothConfig-bucket_reso_steps", "16")
    open_accordion(page, "Text encoder")
    page.locator("#DreamBoothConfig-train_text_encoder input").check()
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text(
        "Chroma full fine-tuning trains the transformer only", timeout=60_000)
    page.locator("#DreamBoothConfig-train_text_encoder input").uncheck()
    open_accordion(page, "Flow matching (Flux, Z-Image, Qwen-Image)")
    choose(page, "DreamBoothConfig-timestep_sampling", "sigmoid")
    open_accordion(page, "Optimization")
    fill(page, "DreamBoothConfig-max_train_steps", "2")
    open_accordion(page, "Samples and saving")
    fill(page, "DreamBoothConfig-sample_every_n_steps", "2")
    fill(page, "DreamBoothConfig-sample_prompts", "zxq cat --s 2 --w 64 --h 64")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("finished at step 2", timeout=180_000)
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=30_000)
    import json

    from trainers.families import file_family
    path = app_server.data_dir / "models" / "Stable-diffusion" / "pagechroma.safetensors"
    assert file_family(path) == "chroma"
    [settings] = (app_server.data_dir / "outputs" / "dreambooth").glob("*/pagechroma/settings-0.json")
    assert json.loads(settings.read_text())["config"]["timestep_sampling"] == "sigmoid"
