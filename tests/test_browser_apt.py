"""APT / DreamArtist through the Train tab's method picker (headless Chromium)."""
from __future__ import annotations

import pytest
import torch
from playwright.sync_api import Page, expect

from tests.conftest import photo
from tests.browser_page import choose, fill, pick_method

pytestmark = pytest.mark.browser


def test_apt_trains_the_pair_from_the_page(page: Page, app_server, tmp_path):
    from trainers.formats.embedding import EmbeddingFile, load_embedding, save_embedding
    folder = tmp_path / "one"
    folder.mkdir()
    photo(1).save(folder / "0.png")
    embeddings = app_server.data_dir / "embeddings"
    embeddings.mkdir(exist_ok=True)
    save_embedding(embeddings / "pagetok.pt",
                   EmbeddingFile(name="pagetok", vectors=torch.zeros(2, 32), step=0))
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    pick_method(page, "APT / DreamArtist")
    page.locator("#train-refresh").click()  # the embedding was written after the page loaded
    choose(page, "AptConfig-embedding", "pagetok")
    fill(page, "AptConfig-data_root", str(folder))
    fill(page, "AptConfig-width", "32")
    fill(page, "AptConfig-height", "32")
    fill(page, "AptConfig-cfg_scale", "1")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("cfg_scale: must be above 1",
                                                           timeout=30_000)
    fill(page, "AptConfig-cfg_scale", "4")
    fill(page, "AptConfig-reconstruction_weight", "0.5")
    fill(page, "AptConfig-steps", "3")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=180_000)
    positive = load_embedding(embeddings / "pagetok.pt")
    negative = load_embedding(embeddings / "pagetok-neg.pt")
    assert positive.step == negative.step == 3
    assert positive.vectors.abs().sum() > 0  # trained away from the zeros it started at

    # The Checkpoints tab copies the pair under a new name, and refuses it a second time
    page.get_by_role("tab", name="Checkpoints").click()
    history = page.locator("#ckpt-history")
    expect(history).to_contain_text("pagetok", timeout=30_000)
    history.get_by_text("pagetok", exact=True).filter(visible=True).first.click()
    expect(page.locator("#ckpt-summary")).to_contain_text("APT / DreamArtist", timeout=30_000)
    page.locator("#ckpt-gallery img").first.click()
    expect(page.locator("#ckpt-details")).to_contain_text("-neg", timeout=30_000)
    fill(page, "ckpt-use-name", "pagepair")
    page.locator("#ckpt-use").click()
    expect(page.locator("#ckpt-use-message")).to_contain_text("pagepair-neg", timeout=30_000)
    copied = load_embedding(embeddings / "pagepair-neg.pt")
    assert copied.name == "pagepair-neg" and torch.equal(copied.vectors, negative.vectors)
    assert torch.equal(load_embedding(embeddings / "pagepair.pt").vectors, positive.vectors)
    page.locator("#ckpt-use").click()
    expect(page.locator("#ckpt-use-message")).to_contain_text("already exists", timeout=30_000)
