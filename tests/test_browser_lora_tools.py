"""The Checkpoints tab's LoRA tools in headless Chromium: Check two LoRA files in models/Lora
(one made for SD 1.x, one with a layer SD 1.x does not have), then merge the good one with
itself at weights as a queued job and see the merged file, checked, in the page."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch
from playwright.sync_api import Page, expect

from tests.browser_page import fill, open_accordion
from tests.lora_check_files import lora_state, write

pytestmark = pytest.mark.browser


def test_check_then_merge_two_loras_in_the_checkpoints_tab(page: Page, app_server):
    loras = app_server.data_dir / "models" / "Lora"
    loras.mkdir(parents=True, exist_ok=True)
    write(loras / "good.safetensors", "sd1")
    write(loras / "twin.safetensors", "sd1")
    state = lora_state("sd1")
    bad = "lora_unet_mid_block_attentions_0_transformer_blocks_5_attn1_to_q"
    state.update({f"{bad}.lora_down.weight": torch.zeros(1, 1280),
                  f"{bad}.lora_up.weight": torch.zeros(1280, 1), f"{bad}.alpha": torch.tensor(1.0)})
    safetensors.torch.save_file(state, str(loras / "odd.safetensors"),
                                {"ss_base_model_version": "sd_v1"})

    page.goto(app_server.url)
    page.get_by_role("tab", name="Checkpoints").click()
    open_accordion(page, "LoRA tools")
    page.locator("#lora-tools-refresh").click()
    files = page.locator("#lora-tools-files input")
    for name in ("good.safetensors", "odd.safetensors"):
        files.click()
        page.get_by_role("option", name=name, exact=True).click()
    page.keyboard.press("Escape")
    page.locator("#lora-tools-check").click()
    result = page.locator("#lora-tools-result")
    expect(result).to_contain_text("good.safetensors — Check (SD 1.x): loads in A1111 / "
                                   "ComfyUI / diffusers", timeout=240_000)
    expect(result).to_contain_text(f"A1111 would not load {bad}.alpha", timeout=30_000)
    expect(result).to_contain_text(f"no SD 1.x module: {bad}")

    # Merge good + twin at weights: queued like a Train-tab job, its message ends with the Check
    page.reload()  # a fresh pick
    page.get_by_role("tab", name="Checkpoints").click()
    open_accordion(page, "LoRA tools")
    page.locator("#lora-tools-refresh").click()
    for name in ("good.safetensors", "twin.safetensors"):
        files.click()
        page.get_by_role("option", name=name, exact=True).click()
    page.keyboard.press("Escape")
    fill(page, "lora-tools-weights", "0.5, 0.25")
    fill(page, "lora-tools-output", "merged")
    page.locator("#lora-tools-merge").click()
    expect(result).to_contain_text("Merged good.safetensors x 0.5, twin.safetensors x 0.25",
                                   timeout=240_000)
    expect(result).to_contain_text("Check (SD 1.x): loads in A1111 / ComfyUI / diffusers")
    assert (loras / "merged.safetensors").is_file()

    # A second merge under that name is refused by name before anything is queued
    page.locator("#lora-tools-merge").click()
    expect(result).to_contain_text("output_name: merged.safetensors exists", timeout=30_000)
