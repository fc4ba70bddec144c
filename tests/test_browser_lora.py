"""Train, interrupt and resume a LoRA in the page (headless Chromium)."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import photo
from tests.browser_page import fill, open_accordion, pick_method

pytestmark = pytest.mark.browser


def test_lora_train_interrupt_resume(page: Page, app_server, tmp_path):
    folder = tmp_path / "train" / "3_zxq cat"
    folder.mkdir(parents=True)
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zxq cat, photo")
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "LoRA")
    fill(page, "LoraConfig-output_name", "browserlora")
    fill(page, "LoraConfig-train_data_dir", str(tmp_path / "train"))
    fill(page, "LoraConfig-resolution", "64")
    fill(page, "LoraConfig-min_bucket_reso", "32")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("bucket_reso_steps = 64", timeout=30_000)
    fill(page, "LoraConfig-bucket_reso_steps", "16")
    fill(page, "LoraConfig-network_dim", "0")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("network_dim", timeout=30_000)
    fill(page, "LoraConfig-network_dim", "4")
    fill(page, "LoraConfig-network_alpha", "2")
    open_accordion(page, "Samples and saving")
    fill(page, "LoraConfig-sample_every_n_steps", "2")
    fill(page, "LoraConfig-sample_prompts", "zxq cat --s 2 --w 64 --h 64")
    fill(page, "LoraConfig-save_every_n_epochs", "0")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#train-status")).to_contain_text("step", timeout=30_000)
    page.locator("#train-interrupt").click()
    expect(page.locator("#train-status")).to_contain_text("interrupted", timeout=60_000)
    lora = app_server.data_dir / "models" / "Lora" / "browserlora.safetensors"
    from trainers.formats.lora import read_lora_metadata
    first = int(read_lora_metadata(lora)["ss_steps"])
    assert first >= 2

    page.locator("#train-start").click()  # same settings: continues from the file
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("running", timeout=60_000)
    expect(page.locator("#train-status")).to_contain_text(f"Resuming at step {first}", timeout=120_000)
    page.wait_for_timeout(3000)  # a few more steps
    page.locator("#train-interrupt").click()
    expect(page.locator("#train-status")).to_contain_text("interrupted", timeout=60_000)
    assert int(read_lora_metadata(lora)["ss_steps"]) > first


def test_two_queued_jobs_both_finish(page: Page, app_server, tmp_path):
    folder = tmp_path / "train" / "1_zxq cat"
    folder.mkdir(parents=True)
    photo(0).save(folder / "0.png")
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "LoRA")
    fill(page, "LoraConfig-train_data_dir", str(tmp_path / "train"))
    fill(page, "LoraConfig-resolution", "64")
    fill(page, "LoraConfig-min_bucket_reso", "32")
    fill(page, "LoraConfig-bucket_reso_steps", "16")
    open_accordion(page, "Optimization")
    fill(page, "LoraConfig-max_train_steps", "3")
    for name in ("queued-a", "queued-b"):
        fill(page, "LoraConfig-output_name", name)
        page.locator("#train-enqueue").click()
        expect(page.locator("#train-message")).to_contain_text("Queued job", timeout=30_000)
        expect(page.locator("#train-message")).to_contain_text(name, timeout=30_000)
    lora = app_server.data_dir / "models" / "Lora"
    expect(page.locator("#train-status")).to_contain_text("LoRA: queued-b", timeout=180_000)
    expect(page.locator("#train-status")).to_contain_text("finished at step 3", timeout=180_000)
    assert (lora / "queued-a.safetensors").exists() and (lora / "queued-b.safetensors").exists()
    expect(page.locator("#train-queue")).to_contain_text("No jobs are waiting", timeout=90_000)
