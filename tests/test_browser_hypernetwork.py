"""Create and train a hypernetwork in the page (headless Chromium)."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import photo
from tests.browser_page import choose, fill, open_accordion, pick_method

pytestmark = pytest.mark.browser


def test_create_train_interrupt_hypernetwork(page: Page, app_server, tmp_path):
    dataset = tmp_path / "images"
    dataset.mkdir()
    for i in range(2):
        photo(i).save(dataset / f"{i}-photo.png")
    page.goto(app_server.url)
    page.get_by_role("tab", name="Create hypernetwork").click()
    fill(page, "CreateHypernetworkConfig-name", "browserhn")
    sizes = page.locator("#CreateHypernetworkConfig-sizes textarea, #CreateHypernetworkConfig-sizes input")
    expect(sizes.first).to_have_value("32, 64")  # the demo model's widths, offered for it
    # the SD2 and SDXL demo models are offered, labelled; choosing one sets its module sizes
    choose(page, "CreateHypernetworkConfig-model", "tiny-demo-sdxl (built-in SDXL demo, random weights)")
    expect(sizes.first).to_have_value("80, 64", timeout=30_000)
    expect(page.get_by_text("built-in SDXL-shaped demo model")).to_be_visible()
    choose(page, "CreateHypernetworkConfig-model", "tiny-demo (built-in SD 1.x demo, random weights)")
    expect(sizes.first).to_have_value("32, 64", timeout=30_000)
    fill(page, "CreateHypernetworkConfig-sizes", "768, 320")
    page.locator("#create-hypernetwork-button").click()  # SD1 sizes don't fit the demo model
    expect(page.locator("#create-hypernetwork-message")).to_contain_text("none of 768", timeout=60_000)
    fill(page, "CreateHypernetworkConfig-sizes", "32, 64")
    fill(page, "CreateHypernetworkConfig-layer_structure", "1, 3")
    page.locator("#create-hypernetwork-button").click()
    expect(page.locator("#create-hypernetwork-message")).to_contain_text("layer_structure", timeout=30_000)
    fill(page, "CreateHypernetworkConfig-layer_structure", "1, 2, 1")
    page.locator("#create-hypernetwork-button").click()
    expect(page.locator("#create-hypernetwork-message")).to_contain_text("Created", timeout=30_000)
    assert (app_server.data_dir / "models" / "hypernetworks" / "browserhn.pt").exists()

    page.get_by_role("tab", name="Train").click()
    pick_method(page, "Hypernetwork")
    page.locator("#HypernetworkTrainingConfig-model input").click()
    for label in ("tiny-demo (built-in SD 1.x demo, random weights)",
                  "tiny-demo-sd2 (built-in SD 2.x v-prediction demo, random weights)",
                  "tiny-demo-sdxl (built-in SDXL demo, random weights)"):
        expect(page.get_by_role("option", name=label, exact=True)).to_be_visible()
    page.get_by_role("option", name="tiny-demo (built-in SD 1.x demo, random weights)", exact=True).click()
    choose(page, "HypernetworkTrainingConfig-hypernetwork", "browserhn")
    fill(page, "HypernetworkTrainingConfig-data_root", str(dataset))
    fill(page, "HypernetworkTrainingConfig-width", "64")
    fill(page, "HypernetworkTrainingConfig-height", "64")
    open_accordion(page, "Saving and previews")
    fill(page, "HypernetworkTrainingConfig-preview_every", "2")
    fill(page, "HypernetworkTrainingConfig-preview_steps", "2")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#train-status")).to_contain_text("Hypernetwork: browserhn", timeout=30_000)
    page.locator("#train-interrupt").click()
    expect(page.locator("#train-status")).to_contain_text("interrupted", timeout=60_000)
    from trainers.formats.hypernetwork import load_hypernetwork
    assert load_hypernetwork(app_server.data_dir / "models" / "hypernetworks" / "browserhn.pt").step >= 2
