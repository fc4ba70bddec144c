"""The Checkpoints tab in headless Chromium: train a LoRA that saves a checkpoint every 2 steps,
open the run from the history, see its checkpoint cards, compare two checkpoints in a grid,
then copy one to models/Lora under a new name (and be refused a second time).

When webui/app.py includes the tab, the real app (python app.py) is used; until then a small
launcher builds a Blocks with the Train and Checkpoints tabs, launched the way app.py does it
(private GRADIO_TEMP_DIR, allowed_paths = outputs only)."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser_page import box, fill, open_accordion, pick_method
from tests.conftest import photo

pytestmark = pytest.mark.browser

@pytest.fixture
def server(app_server):
    return app_server


def test_train_open_gallery_compare_and_use_a_checkpoint(page: Page, server, tmp_path):
    data = server.data_dir
    folder = data / "train" / "2_zxq cat"
    folder.mkdir(parents=True)
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zxq cat")

    # Train: a checkpoint every 2 steps, a preview at the end
    page.goto(server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "LoRA")
    expect(page.locator("#LoraConfig-output_name")).to_be_visible(timeout=30_000)
    expect(page.locator("#TextualInversionConfig-embedding")).to_be_hidden(timeout=30_000)
    fill(page, "LoraConfig-output_name", "browserlora")
    fill(page, "LoraConfig-train_data_dir", "train")
    fill(page, "LoraConfig-resolution", "64")
    fill(page, "LoraConfig-min_bucket_reso", "32")
    fill(page, "LoraConfig-bucket_reso_steps", "16")
    fill(page, "LoraConfig-network_dim", "4")
    fill(page, "LoraConfig-network_alpha", "4")
    open_accordion(page, "Optimization")
    fill(page, "LoraConfig-max_train_steps", "4")
    fill(page, "LoraConfig-learning_rate", "0.02")
    open_accordion(page, "Samples and saving")
    fill(page, "LoraConfig-sample_every_n_steps", "4")
    fill(page, "LoraConfig-sample_prompts", "zxq cat --s 1 --w 64 --h 64")
    page.locator("#LoraConfig-sample_at_first input").uncheck()
    fill(page, "LoraConfig-save_every_n_epochs", "0")
    fill(page, "LoraConfig-save_every_n_steps", "2")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("finished at step 4", timeout=180_000)

    # The run in the history; its checkpoints as cards (step 2 has no preview: a placeholder)
    page.get_by_role("tab", name="Checkpoints").click()
    history = page.locator("#ckpt-history")
    expect(history).to_contain_text("browserlora", timeout=30_000)
    expect(history).to_contain_text("finished")
    history.get_by_text("browserlora", exact=True).filter(visible=True).first.click()
    expect(page.locator("#ckpt-summary")).to_contain_text("Status: finished", timeout=30_000)
    cards = page.locator("#ckpt-gallery img")
    expect(cards).to_have_count(2, timeout=30_000)
    expect(page.locator("#ckpt-gallery")).to_contain_text("step 2 · loss")
    expect(page.locator("#ckpt-gallery")).to_contain_text("step 4 · loss")
    run_dir = next((data / "outputs" / "lora").glob("*/browserlora"))
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["browserlora-2.safetensors"]

    # Compare the two checkpoints: a queued job, then the grid in the page and on disk
    pick = page.locator("#ckpt-compare-pick")
    pick.get_by_label("step 2", exact=True).check()
    pick.get_by_label("step 4 (final)", exact=True).check()
    fill(page, "ckpt-compare-seeds", "5")
    fill(page, "ckpt-compare-steps", "1")
    page.locator("#ckpt-compare-start").click()
    expect(page.locator("#ckpt-compare-status")).to_contain_text("Grid saved", timeout=120_000)
    expect(page.locator("#ckpt-grid img")).to_be_visible(timeout=30_000)
    from trainers.compare import read_grid_labels
    grids = list((data / "outputs" / "grids").glob("browserlora-*.png"))
    assert len(grids) == 1
    labels = read_grid_labels(grids[0])
    assert labels["rows"] == ["step 2 · strength 1", "step 4 (final) · strength 1"]
    assert labels["columns"] == ["zxq cat · seed 5"]

    # Pick step 2 and copy it to models/Lora; a second copy under that name is refused
    cards.first.click()
    expect(page.locator("#ckpt-details")).to_contain_text("step 2", timeout=30_000)
    expect(box(page, "ckpt-use-name")).to_have_value("browserlora-2", timeout=30_000)
    fill(page, "ckpt-use-name", "picked")
    page.locator("#ckpt-use").click()
    expect(page.locator("#ckpt-use-message")).to_contain_text("Copied", timeout=30_000)
    picked = data / "models" / "Lora" / "picked.safetensors"
    assert picked.read_bytes() == (run_dir / "checkpoints" / "browserlora-2.safetensors").read_bytes()
    page.locator("#ckpt-use").click()
    expect(page.locator("#ckpt-use-message")).to_contain_text("already exists", timeout=30_000)
