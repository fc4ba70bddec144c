"""The Create embedding and Train tabs driven in headless Chromium against the real app."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser_page import choose, fill, open_accordion
from tests.conftest import photo

pytestmark = pytest.mark.browser


def test_create_train_preview_interrupt(page: Page, app_server, tmp_path):
    dataset = tmp_path / "images"
    dataset.mkdir()
    for i in range(3):
        photo(i).save(dataset / f"{i}-photo.png")
    page.goto(app_server.url)

    # Create an embedding
    fill(page, "CreateEmbeddingConfig-name", "browsertok")
    fill(page, "CreateEmbeddingConfig-vectors_per_token", "2")
    page.locator("#create-embedding").click()
    expect(page.locator("#create-message")).to_contain_text("Created", timeout=60_000)
    assert (app_server.data_dir / "embeddings" / "browsertok.pt").exists()

    # A second create with the same name is refused and the file is kept
    before = (app_server.data_dir / "embeddings" / "browsertok.pt").read_bytes()
    page.locator("#create-embedding").click()
    expect(page.locator("#create-message")).to_contain_text("already exists", timeout=30_000)
    assert (app_server.data_dir / "embeddings" / "browsertok.pt").read_bytes() == before

    # Train it
    page.get_by_role("tab", name="Train").click()
    choose(page, "TextualInversionConfig-embedding", "browsertok")
    fill(page, "TextualInversionConfig-data_root", str(dataset))
    fill(page, "TextualInversionConfig-width", "100")  # not a multiple of 8
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("multiple of 8", timeout=30_000)

    fill(page, "TextualInversionConfig-width", "64")
    fill(page, "TextualInversionConfig-height", "64")
    fill(page, "TextualInversionConfig-steps", "100000")
    open_accordion(page, "Saving and previews")
    fill(page, "TextualInversionConfig-preview_every", "3")
    fill(page, "TextualInversionConfig-save_every", "3")
    fill(page, "TextualInversionConfig-preview_steps", "2")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)

    # A second click while it runs is refused
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("already running", timeout=30_000)

    expect(page.locator("#train-previews img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible(timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("step", timeout=30_000)

    # Reloading re-attaches to the running job
    page.reload()
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("running", timeout=30_000)

    page.locator("#train-interrupt").click()
    expect(page.locator("#train-status")).to_contain_text("interrupted", timeout=60_000)
    from trainers.formats.embedding import load_embedding
    saved = load_embedding(app_server.data_dir / "embeddings" / "browsertok.pt")
    assert saved.step >= 3
    page.screenshot(path=str(tmp_path / "train.png"), full_page=True)


def test_export_config_shows_toml(page: Page, app_server):
    import tomllib
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    fill(page, "TextualInversionConfig-learn_rate", "0.01:10, 0.001")
    page.locator("#train-export").click()
    # validation needs an embedding and a dataset; the message names them
    expect(page.locator("#train-message")).to_contain_text("embedding", timeout=30_000)
