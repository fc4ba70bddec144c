"""Train a Z-Image LoRA on the built-in Z-Image demo in the page (headless Chromium): a
text-encoder LoRA, which Z-Image has none of, is refused by name; the run previews and writes
the file ZImagePipeline loads."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser_page import choose, fill, open_accordion, pick_method
from tests.conftest import photo

pytestmark = pytest.mark.browser


def test_zimage_lora_from_the_page(page: Page, app_server, tmp_path):
    folder = tmp_path / "train" / "2_zxq cat"
    folder.mkdir(parents=True)
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zxq cat, photo")
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "LoRA")
    choose(page, "LoraConfig-model", "tiny-demo-zimage (built-in Z-Image demo, random weights)")
    fill(page, "LoraConfig-output_name", "pagezimage")
    fill(page, "LoraConfig-train_data_dir", str(tmp_path / "train"))
    fill(page, "LoraConfig-resolution", "64")
    fill(page, "LoraConfig-min_bucket_reso", "32")
    fill(page, "LoraConfig-bucket_reso_steps", "16")
    page.locator("#train-start").click()  # U-Net only is off by default
    expect(page.locator("#train-message")).to_contain_text(
        "Z-Image has no text-encoder LoRA", timeout=60_000)
    page.locator("#LoraConfig-network_train_unet_only input").check()
    open_accordion(page, "Optimization")
    fill(page, "LoraConfig-max_train_steps", "4")
    open_accordion(page, "Samples and saving")
    fill(page, "LoraConfig-sample_every_n_steps", "2")
    fill(page, "LoraConfig-sample_prompts", "zxq cat --s 2 --w 64 --h 64")
    fill(page, "LoraConfig-save_every_n_epochs", "0")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#train-status")).to_contain_text("finished at step 4", timeout=180_000)
    from trainers.formats.lora import load_lora
    state, _ = load_lora(app_server.data_dir / "models" / "Lora" / "pagezimage.safetensors")
    assert "lora_unet_layers_0_attention_to_q.lora_down.weight" in state
