"""The Preprocess tab with a VLM captioner and a WD tagger, driven in headless Chromium: a tiny
JoyCaption-layout LLaVA in models/vlm, tags in .txt and captions in .caption, a refused setting
named before the job starts, and a resumed run that keeps what is on disk."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.browser_page import choose, fill, open_accordion
from tests.conftest import photo

pytestmark = pytest.mark.browser


def test_vlm_with_tagger_separate_files_and_resume(page: Page, app_server, tmp_path):
    from preprocess import PreprocessConfig, captioners, run
    from preprocess.testing import build_tiny_wd14
    from preprocess.testing_vlm import build_tiny_vlm

    data = app_server.data_dir
    source = data / "photos"
    source.mkdir(parents=True)
    for i in range(2):
        photo(i, 64).save(source / f"{i}-photo.png")
    build_tiny_vlm(data / "models" / "vlm" / "joycaption", "llava")
    build_tiny_wd14(data / "models" / "wd14" / "wd-eva02-large-tagger-v3",
                    [("photo", "0", (0, 0, 0), 10.0)], v3=True)

    page.goto(app_server.url)
    page.get_by_role("tab", name="Preprocess images").click()
    fill(page, "PreprocessConfig-source", "photos")
    fill(page, "PreprocessConfig-destination", "captioned")
    fill(page, "PreprocessConfig-width", "64")
    fill(page, "PreprocessConfig-height", "64")
    open_accordion(page, "Captioners")
    boxes = page.locator("#PreprocessConfig-captioners")
    boxes.get_by_label("WD tagger v2 / v3 (tags)").check()
    boxes.get_by_label("VLM: Florence-2, Qwen-VL, JoyCaption (caption)").check()
    expect(page.locator("#PreprocessConfig-vlm_model")).to_be_visible(timeout=30_000)
    fill(page, "PreprocessConfig-vlm_model", "joycaption")
    choose(page, "PreprocessConfig-caption_layout", "separate files")
    choose(page, "PreprocessConfig-device", "cpu")

    # a bad setting is named and nothing starts
    fill(page, "PreprocessConfig-vlm_max_new_tokens", "0")
    page.locator("#preprocess-start").click()
    expect(page.locator("#preprocess-message")).to_contain_text("vlm_max_new_tokens",
                                                                timeout=30_000)
    assert not (data / "captioned").exists()

    fill(page, "PreprocessConfig-vlm_max_new_tokens", "6")
    page.locator("#preprocess-start").click()
    summary = page.locator("#preprocess-summary textarea")
    expect(summary).to_have_value(re.compile(r"^Done: 2 of 2 files"), timeout=120_000)
    out = data / "captioned"
    images = sorted(out.glob("*.png"))
    assert [p.name for p in images] == ["00000-0-0-photo.png", "00001-0-1-photo.png"]
    assert all(p.with_suffix(".txt").read_text() == "photo" for p in images)

    # the same captions as the engine run on its own
    captioners.unload_all()
    run(PreprocessConfig(source=str(source), destination=str(tmp_path / "engine"), width=64,
                         height=64, captioners=["vlm"], vlm_model=str(data / "models" / "vlm" /
                                                                      "joycaption"),
                         vlm_max_new_tokens=6, device="cpu"))
    for image in images:
        caption = image.with_suffix(".caption").read_text()
        assert caption and caption == (tmp_path / "engine" / image.name).with_suffix(
            ".txt").read_text()

    # resume: one caption is missing; the rest stays as it is
    kept = images[0].with_suffix(".caption")
    before = (kept.read_bytes(), kept.stat().st_mtime_ns)
    images[1].with_suffix(".caption").unlink()
    page.locator("#PreprocessConfig-skip_existing input").check()
    page.locator("#preprocess-start").click()
    expect(summary).to_have_value(re.compile(r"Kept 1 images already captioned"),
                                  timeout=120_000)
    assert (kept.read_bytes(), kept.stat().st_mtime_ns) == before
    assert images[1].with_suffix(".caption").read_text()
