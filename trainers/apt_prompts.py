"""APT / DreamArtist prompt words (torch-free, the page and the compare grid use them too): the
positive embedding `<name>` goes in the prompt, its partner `<name>-neg` in the negative prompt."""
from __future__ import annotations

import re

NEGATIVE_SUFFIX = "-neg"


def negative_name(name: str) -> str:
    return name + NEGATIVE_SUFFIX


def negative_prompt(text: str, name: str) -> str:
    """The text with the embedding's name swapped for its negative partner."""
    return re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", negative_name(name), text)


def pair_negative(prompt: str, name: str, negative: str = "") -> str:
    """The negative prompt that goes with `prompt` (DreamArtist's previews): the prompt with
    `<name>-neg` in place of the name (just `<name>-neg` when the prompt lacks the name), then
    any negative prompt given. A negative prompt that already names `<name>-neg` is kept."""
    negative = negative.strip()
    if re.search(rf"(?<![\w-]){re.escape(negative_name(name))}(?![\w-])", negative):
        return negative
    paired = negative_prompt(prompt, name)
    if paired == prompt:
        paired = negative_name(name)
    return f"{paired}, {negative}" if negative else paired
