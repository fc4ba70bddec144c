"""A page reload after training (issue #23, item 9), and the demo model's sizes, in headless
Chromium against the real app: the reloaded page reads its dropdowns' choices fresh, restores the
last job's values without an error, clears (with a note) a value whose file is gone, and a
click of another method's Train sends and checks only that method's form."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import photo
from tests.browser_page import choose, fill, open_accordion, pick_method

pytestmark = pytest.mark.browser


def no_error_shown(page: Page) -> None:
    expect(page.get_by_text("is not one of the choices")).to_have_count(0)
    expect(page.locator("#train-message")).not_to_contain_text("Error")


def test_create_train_reload_then_train_another_method(page: Page, app_server, tmp_path):
    images = tmp_path / "images"
    kohya = tmp_path / "kohya" / "1_zxq cat"
    for folder in (images, kohya):
        folder.mkdir(parents=True)
    for i in range(2):
        photo(i).save(images / f"{i}.png")
        photo(i).save(kohya / f"{i}.png")
    page.goto(app_server.url)  # built before the embedding exists

    fill(page, "CreateEmbeddingConfig-name", "reloademb")
    page.locator("#create-embedding").click()
    expect(page.locator("#create-message")).to_contain_text("Created", timeout=60_000)

    page.get_by_role("tab", name="Train").click()
    # only demo models here: the sizes start small, and the page says why
    expect(page.locator("#TextualInversionConfig-width input")).to_have_value("64")
    expect(page.locator("#train-model-note")).to_contain_text("64 px")
    choose(page, "TextualInversionConfig-embedding", "reloademb")
    fill(page, "TextualInversionConfig-data_root", str(images))
    fill(page, "TextualInversionConfig-steps", "3")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=180_000)

    page.reload()
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#TextualInversionConfig-embedding input")).to_have_value("reloademb",
                                                                                 timeout=30_000)
    expect(page.locator("#TextualInversionConfig-steps input")).to_have_value("3")
    no_error_shown(page)

    pick_method(page, "LoRA")
    fill(page, "LoraConfig-output_name", "afterreload")
    fill(page, "LoraConfig-train_data_dir", str(tmp_path / "kohya"))
    open_accordion(page, "Optimization")
    fill(page, "LoraConfig-max_train_steps", "2")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started job", timeout=30_000)
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=180_000)
    assert (app_server.data_dir / "models" / "Lora" / "afterreload.safetensors").exists()
    no_error_shown(page)


def test_a_restored_value_whose_file_was_deleted_is_cleared_with_a_note(page: Page, app_server,
                                                                        tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    photo(0).save(images / "0.png")
    page.goto(app_server.url)
    fill(page, "CreateEmbeddingConfig-name", "goneemb")
    page.locator("#create-embedding").click()
    expect(page.locator("#create-message")).to_contain_text("Created", timeout=60_000)
    page.get_by_role("tab", name="Train").click()
    choose(page, "TextualInversionConfig-embedding", "goneemb")
    fill(page, "TextualInversionConfig-data_root", str(images))
    fill(page, "TextualInversionConfig-steps", "2")
    page.locator("#train-start").click()
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=180_000)

    (app_server.data_dir / "embeddings" / "goneemb.pt").unlink()
    page.reload()
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-message")).to_contain_text("goneemb no longer exists",
                                                           timeout=30_000)
    expect(page.locator("#TextualInversionConfig-embedding input")).to_have_value("")
    expect(page.get_by_text("is not one of the choices")).to_have_count(0)
    # the rest of the job's settings are restored
    expect(page.locator("#TextualInversionConfig-steps input")).to_have_value("2")

    # choosing a demo model sets the sizes again after the user changed them
    fill(page, "TextualInversionConfig-width", "512")
    choose(page, "TextualInversionConfig-model",
           "tiny-demo-sd2 (built-in SD 2.x v-prediction demo, random weights)")
    expect(page.locator("#TextualInversionConfig-width input")).to_have_value("64", timeout=30_000)
