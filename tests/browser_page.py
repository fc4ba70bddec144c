"""Playwright helpers the browser tests share: type into a field by its elem_id (and check the
value stayed), pick a dropdown option, open an accordion."""
from __future__ import annotations

import re

from playwright.sync_api import Page, expect


OPEN = re.compile(r"(^|\s)open(\s|$)")


def box(page: Page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def fill(page: Page, elem_id: str, value: str) -> None:
    """Type a value, leave the field, and check the page kept it."""
    field = box(page, elem_id)
    for _ in range(3):
        field.fill(value)
        field.press("Tab")
        page.wait_for_timeout(100)
        if field.input_value() == value:
            return
    expect(field).to_have_value(value)


def choose(page: Page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def open_accordion(page: Page, title: str) -> None:
    """Open the visible accordion titled `title` (a no-op when it is open already)."""
    label = page.locator("button.label-wrap").filter(
        has=page.get_by_text(title, exact=True)).filter(visible=True).first
    if "open" not in (label.get_attribute("class") or "").split():
        label.click()
    expect(label).to_have_class(OPEN)


def pick_method(page: Page, title: str) -> None:
    """Choose a method in the Train tab's picker (a form's field may have the same label)."""
    page.locator("#train-method").get_by_label(title, exact=True).check()
