"""A LoRA trained by two `accelerate launch` processes from the page: the same loss plot,
previews and interrupt as a one-process run (CPU processes over gloo). Resuming a file in
several processes is tested in test_distributed.py (one launch costs ~a minute here)."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser_support import AppProcess
from tests.conftest import photo
from tests.browser_page import choose, fill, open_accordion, pick_method

pytestmark = pytest.mark.browser


@pytest.fixture
def two_process_app(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("DANLU_CPU_PROCESSES", "2")  # the picker, on a machine without GPUs
    server = AppProcess(tmp_path / "data", tiny_model_dir)
    yield server
    server.stop()


def test_two_process_lora_trains_and_interrupts(page: Page, two_process_app, tmp_path):
    from trainers.formats.lora import read_lora_metadata
    folder = tmp_path / "train" / "2_zxq cat"
    folder.mkdir(parents=True)
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zxq cat, photo")
    page.goto(two_process_app.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "LoRA")
    fill(page, "LoraConfig-output_name", "twolora")
    fill(page, "LoraConfig-train_data_dir", str(tmp_path / "train"))
    fill(page, "LoraConfig-resolution", "64")
    fill(page, "LoraConfig-min_bucket_reso", "32")
    fill(page, "LoraConfig-bucket_reso_steps", "16")
    fill(page, "LoraConfig-network_dim", "4")
    open_accordion(page, "Samples and saving")
    fill(page, "LoraConfig-sample_every_n_steps", "2")
    fill(page, "LoraConfig-sample_prompts", "zxq cat --s 2 --w 64 --h 64")
    fill(page, "LoraConfig-save_every_n_epochs", "0")
    expect(page.locator("#train-processes")).to_contain_text("Processes (CPU, for testing)")
    choose(page, "train-processes", "2")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("LoRA: twolora (2 processes)",
                                                          timeout=30_000)
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=300_000)
    expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible(timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("step", timeout=30_000)
    page.locator("#train-interrupt").click()
    expect(page.locator("#train-status")).to_contain_text("interrupted", timeout=120_000)
    lora = two_process_app.data_dir / "models" / "Lora" / "twolora.safetensors"
    first = int(read_lora_metadata(lora)["ss_steps"])
    assert first >= 2
    assert not list((two_process_app.data_dir / ".cache" / "launch").iterdir())  # cleaned up
