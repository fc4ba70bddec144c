"""Captions and prompt templates with A1111's rules: `<stem>.txt` beside the image, else the
file name minus its numeric prefix (optionally only the words a regex finds); templates are
lines with [name] and [filewords]."""
from __future__ import annotations

import random
import re
from pathlib import Path

NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")


class TemplateError(ValueError):
    pass


def filewords_for(image: Path, word_regex: str = "", join_string: str = " ") -> str:
    caption_file = image.with_suffix(".txt")
    if caption_file.is_file():
        return caption_file.read_text(encoding="utf-8", errors="replace").strip()
    text = NUMBERS_AT_START.sub("", image.stem)
    if word_regex:
        text = join_string.join(re.findall(word_regex, text))
    return text


def list_templates(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.txt")) if folder.is_dir() else []


def read_template(folder: Path, name: str) -> list[str]:
    path = folder / name
    if not name or Path(name).name != name or not path.is_file():
        known = ", ".join(list_templates(folder)) or "none"
        raise TemplateError(f"template: {name!r} is not a template in {folder} (known: {known})")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise TemplateError(f"template: {name} has no lines")
    return lines


def make_prompt(template_lines: list[str], name: str, filewords: str, rng: random.Random,
                shuffle_tags: bool = False, tag_drop_out: float = 0.0) -> str:
    line = rng.choice(template_lines)
    tags = filewords.split(",")
    if tag_drop_out > 0:
        tags = [tag for tag in tags if rng.random() > tag_drop_out]
    if shuffle_tags:
        rng.shuffle(tags)
    return line.replace("[filewords]", ",".join(tags)).replace("[name]", name)
