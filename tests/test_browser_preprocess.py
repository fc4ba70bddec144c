"""The Preprocess images tab driven in headless Chromium: a run with flip, split and a WD v3
tagger (tiny weights in the real layout), the live gallery and summary, the dataset editor
(per-image caption, batch tag removal, the dataset check) and a bad-input case.

When webui/app.py includes the tab, the real app (python app.py) is used; until then a small
launcher builds a Blocks with just this tab and a JobRunner, launched the way app.py does it
(private GRADIO_TEMP_DIR, allowed_paths = outputs only)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser_page import choose, fill, open_accordion
from tests.conftest import photo

pytestmark = pytest.mark.browser

CAPTIONS = ["sks, a woman in a space suit,", "sks, a cup of coffee,", "sks, a cat,"]
WD14_TABLE = [("photo", "0", (0, 0, 0), 10.0),        # always scores ~1
              ("outdoors", "0", (0, 0, 0), -10.0)]    # never

@pytest.fixture
def server(app_server):
    return app_server


def put_dataset(data_dir: Path) -> Path:
    from preprocess.testing import build_tiny_wd14
    source = data_dir / "photos"
    source.mkdir(parents=True)
    for i, caption in enumerate(CAPTIONS):
        image = photo(i, 64) if i < 2 else photo(i, 64).resize((256, 64))  # wide: split
        image.save(source / f"{i}-photo.png")
        (source / f"{i}-photo.txt").write_text(caption, encoding="utf-8")
    (source / "broken.jpg").write_bytes(b"this is not an image")
    build_tiny_wd14(data_dir / "models" / "wd14" / "wd-eva02-large-tagger-v3", WD14_TABLE,
                    v3=True)
    return source


def test_preprocess_gallery_summary_and_dataset_editor(page: Page, server, tmp_path):
    data = server.data_dir
    source = put_dataset(data)
    sources_before = {p.name: p.read_bytes() for p in source.iterdir()}
    page.goto(server.url)
    page.get_by_role("tab", name="Preprocess images").click()

    # Bad input: destination = source names the field, nothing is written
    fill(page, "PreprocessConfig-source", "photos")
    fill(page, "PreprocessConfig-destination", "photos")
    page.locator("#preprocess-start").click()
    expect(page.locator("#preprocess-message")).to_contain_text(
        "destination: must differ from the source folder", timeout=30_000)

    # A run with flip + split + the WD14 captioner, existing captions in front
    fill(page, "PreprocessConfig-destination", "dataset")
    fill(page, "PreprocessConfig-width", "64")
    fill(page, "PreprocessConfig-height", "64")
    choose(page, "PreprocessConfig-existing_caption", "prepend")
    page.locator("#PreprocessConfig-flip input").check()
    page.locator("#PreprocessConfig-split input").check()
    open_accordion(page, "Captioners")
    page.locator("#PreprocessConfig-captioners").get_by_label("WD tagger v2 / v3 (tags)").check()
    expect(page.locator("#PreprocessConfig-wd14_model")).to_be_visible(timeout=30_000)
    page.locator("#preprocess-start").click()
    expect(page.locator("#preprocess-message")).to_contain_text("Started job", timeout=30_000)
    page.locator("#preprocess-start").click()  # a second request is refused while it runs
    message = page.locator("#preprocess-message")
    expect(message).to_contain_text(re.compile("already running|Started job 2"), timeout=30_000)
    # (on a fast machine the first job may have finished already; then job 2 rewrites the same files)

    # 2 square photos x 2 (flip) + the wide one split into 5 pieces x 2 (flip)
    expect(page.locator("#preprocess-gallery img")).to_have_count(14, timeout=120_000)
    summary = page.locator("#preprocess-summary textarea")
    expect(summary).to_have_value(re.compile(r"^Done: 3 of 4 files"), timeout=60_000)
    text = summary.input_value()
    assert text.startswith("Done: 3 of 4 files"), text
    assert "broken.jpg" in text, text
    expect(page.locator("#preprocess-status")).to_contain_text("images 4/4", timeout=30_000)

    # A reload re-attaches: the form, status, gallery and summary of the last job come back
    page.reload()
    page.get_by_role("tab", name="Preprocess images").click()
    expect(page.locator("#preprocess-gallery img")).to_have_count(14, timeout=30_000)
    expect(summary).to_have_value(re.compile(r"^Done: 3 of 4 files"), timeout=30_000)
    expect(page.locator("#PreprocessConfig-destination input, #PreprocessConfig-destination "
                        "textarea").first).to_have_value("dataset", timeout=30_000)
    expect(page.locator("#PreprocessConfig-flip input")).to_be_checked()

    out = data / "dataset"
    captions = sorted(out.glob("*.txt"))
    assert len(sorted(out.glob("*.png"))) == 14 and len(captions) == 14
    assert all(c.read_text(encoding="utf-8").endswith(", photo") for c in captions)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == sources_before
    thumbs = data / "outputs" / "preprocess" / "thumbnails"
    assert len(list(thumbs.rglob("*.jpg"))) == 14  # the page shows copies, not the dataset

    # Dataset editor on the output folder
    page.locator("#preprocess-edit-destination").click()
    expect(page.locator("#preprocess-edit-gallery img")).to_have_count(14, timeout=30_000)
    expect(page.locator("#preprocess-edit-message")).to_contain_text("14 images, 14 with a caption")
    expect(page.locator("#preprocess-edit-tag-table")).to_contain_text("photo")

    # Edit one caption
    page.locator("#preprocess-edit-gallery img").first.click()
    expect(page.locator("#preprocess-edit-selected")).to_contain_text("00000-0-0-photo.png",
                                                                      timeout=30_000)
    caption_box = page.locator("#preprocess-edit-caption textarea")
    expect(caption_box).to_have_value("sks, a woman in a space suit, photo", timeout=30_000)
    caption_box.fill("sks, astronaut, photo, photo")
    page.locator("#preprocess-edit-save").click()
    expect(page.locator("#preprocess-edit-message")).to_contain_text("Saved", timeout=30_000)
    assert (out / "00000-0-0-photo.txt").read_text(encoding="utf-8") == \
        "sks, astronaut, photo, photo"

    # Remove a tag from every caption (the default operation is "Remove tags"), picked from
    # the tag-frequency table
    page.locator("#preprocess-edit-tag-table").get_by_text("photo", exact=True).click()
    expect(page.locator("#preprocess-edit-tags input, #preprocess-edit-tags textarea").first
           ).to_have_value("photo", timeout=30_000)
    page.locator("#preprocess-edit-apply").click()
    expect(page.locator("#preprocess-edit-message")).to_contain_text(
        "changed 14 of 14 captions", timeout=30_000)
    texts = [c.read_text(encoding="utf-8") for c in captions]
    assert not any("photo" in t for t in texts), texts
    assert all(t.startswith("sks, ") for t in texts), texts
    assert (out / "00000-0-0-photo.txt").read_text(encoding="utf-8") == "sks, astronaut"
    expect(caption_box).to_have_value("sks, astronaut", timeout=30_000)
    expect(page.locator("#preprocess-edit-tag-table")).not_to_contain_text("photo",
                                                                           timeout=30_000)
    assert not list(out.glob(".*.tmp"))  # atomic saves leave no temporary files
    page.screenshot(path=str(tmp_path / "editor.png"), full_page=True)

    # The dataset check: at 512 px every 64 px image is too small; at 64 px none is
    page.locator("#preprocess-check").click()
    report = page.locator("#preprocess-check-report textarea")
    expect(report).to_have_value(re.compile(
        r"^Dataset check of .*dataset \(flat folder\): 14 images.*14 images smaller than "
        r"512x512.*00000-0-0-photo\.png \(64x64\).*Most frequent tags: sks \(14\)", re.S),
        timeout=30_000)
    fill(page, "preprocess-check-resolution", "64")
    page.locator("#preprocess-check").click()
    expect(report).to_have_value(re.compile(r"^(?!.*smaller than).*14 images", re.S),
                                 timeout=30_000)

    # A folder that does not exist is named in the editor's message
    fill(page, "preprocess-edit-folder", "no-such-folder")
    page.locator("#preprocess-edit-load").click()
    expect(page.locator("#preprocess-edit-message")).to_contain_text(
        "folder: 'no-such-folder' does not exist", timeout=30_000)
    page.get_by_role("tab", name="Process a folder").click()
    page.screenshot(path=str(tmp_path / "preprocess.png"), full_page=True)
