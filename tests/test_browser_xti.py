"""XTI (P+) through the Train tab's method picker (headless Chromium)."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import photo
from tests.browser_page import fill, pick_method

pytestmark = pytest.mark.browser


def test_xti_trains_per_layer_vectors_from_the_page(page: Page, app_server, tmp_path):
    from trainers.formats.xti import load_xti
    folder = tmp_path / "images"
    folder.mkdir()
    photo(3).save(folder / "0.png")
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "XTI (P+)")
    fill(page, "XtiConfig-output_name", "../escape")
    fill(page, "XtiConfig-data_root", str(folder))
    fill(page, "XtiConfig-width", "32")
    fill(page, "XtiConfig-height", "32")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("output_name", timeout=30_000)
    fill(page, "XtiConfig-output_name", "pagexti")
    fill(page, "XtiConfig-num_vectors_per_token", "2")
    fill(page, "XtiConfig-steps", "2")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=180_000)
    saved = load_xti(app_server.data_dir / "models" / "xti" / "pagexti.safetensors")
    assert list(saved.layers) == ["IN01", "MID", "OUT02", "OUT03"] and saved.step == 2
    assert all(v.shape == (2, 32) for v in saved.layers.values())
