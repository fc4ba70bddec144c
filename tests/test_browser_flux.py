"""Train a Flux.1 LoRA on the built-in Flux demo in the page (headless Chromium): the option
that does not apply to Flux is refused by name, the run previews and writes kohya's Flux
names."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser_page import choose, fill, open_accordion, pick_method
from tests.conftest import photo

pytestmark = pytest.mark.browser


def test_flux_lora_from_the_page(page: Page, app_server, tmp_path):
    folder = tmp_path / "train" / "2_zxq cat"
    folder.mkdir(parents=True)
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zxq cat, photo")
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "LoRA")
    choose(page, "LoraConfig-model", "tiny-demo-flux (built-in Flux.1 demo, random weights)")
    fill(page, "LoraConfig-output_name", "pageflux")
    fill(page, "LoraConfig-train_data_dir", str(tmp_path / "train"))
    fill(page, "LoraConfig-resolution", "64")
    fill(page, "LoraConfig-min_bucket_reso", "32")
    fill(page, "LoraConfig-bucket_reso_steps", "16")
    fill(page, "LoraConfig-conv_dim", "4")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text(
        "conv_dim: Flux.1 has no convolutions", timeout=60_000)
    fill(page, "LoraConfig-conv_dim", "0")
    open_accordion(page, "Optimization")
    fill(page, "LoraConfig-max_train_steps", "4")
    open_accordion(page, "Samples and saving")
    fill(page, "LoraConfig-sample_every_n_steps", "2")
    fill(page, "LoraConfig-sample_prompts", "zxq cat --s 2 --w 64 --h 64")
    fill(page, "LoraConfig-save_every_n_epochs", "0")
    open_accordion(page, "Flow matching (Flux)")
    fill(page, "LoraConfig-guidance_scale", "3.5")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#train-status")).to_contain_text("finished at step 4", timeout=180_000)
    from trainers.formats.lora import load_lora
    state, meta = load_lora(app_server.data_dir / "models" / "Lora" / "pageflux.safetensors")
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in state
    assert meta["ss_base_model_version"] == "flux1"
