"""'Fit my GPU' in the Train tab (headless Chromium): with the card picked, the LoRA form's
memory options change to the cheapest that fit and the page says which and why; detect without
a GPU says so; the form then estimates under the card."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser_page import box, choose, fill, open_accordion, pick_method

pytestmark = pytest.mark.browser


def test_fit_my_gpu_sets_the_memory_options(page: Page, app_server):
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "LoRA")
    fill(page, "LoraConfig-output_name", "fitted")
    fill(page, "LoraConfig-train_data_dir", "train")
    fill(page, "LoraConfig-resolution", "4096")  # the demo at 4096 px, batch 2: ~11 GB in fp32
    open_accordion(page, "Optimization")
    fill(page, "LoraConfig-train_batch_size", "2")
    page.locator("#train-fit").filter(visible=True).click()
    expect(page.locator("#train-message")).to_contain_text("Fits 8 GB: chose bf16 mixed precision",
                                                           timeout=30_000)
    open_accordion(page, "Speed and memory")
    expect(box(page, "LoraConfig-mixed_precision")).to_have_value("bf16")
    page.locator("#train-memory").filter(visible=True).click()  # the form now holds the fit
    expect(page.locator("#train-message")).to_contain_text("Should fit an 8 GB card",
                                                           timeout=30_000)

    choose(page, "train-vram", "detect")
    page.locator("#train-fit").filter(visible=True).click()
    expect(page.locator("#train-message")).to_contain_text("no NVIDIA GPU found", timeout=30_000)
