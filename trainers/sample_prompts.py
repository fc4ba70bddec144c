"""kohya's sample-prompt lines: `prompt --n negative --w 512 --h 512 --d seed --l cfg --s steps`."""
from __future__ import annotations

import re

from trainers.sampling import PreviewSettings

FLAG = re.compile(r"\s--([a-z]+)\s+")


class SamplePromptError(ValueError):
    pass


def parse_sample_prompts(text: str, defaults: PreviewSettings) -> list[PreviewSettings]:
    """One PreviewSettings per non-empty, non-comment line; flags override the defaults."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = FLAG.split(" " + line + " ")
        prompt = parts[0].strip()
        values = dict(zip(parts[1::2], (p.strip() for p in parts[2::2])))
        settings = PreviewSettings(**{**defaults.__dict__, "prompt": prompt})
        for flag, value in values.items():
            try:
                if flag == "n":
                    settings.negative = value
                elif flag == "w":
                    settings.width = _multiple_of_8(int(value), "--w")
                elif flag == "h":
                    settings.height = _multiple_of_8(int(value), "--h")
                elif flag == "d":
                    settings.seed = int(value)
                elif flag == "l":
                    settings.cfg = float(value)
                elif flag == "s":
                    settings.steps = max(1, min(int(value), 150))
                else:
                    raise SamplePromptError(f"unknown flag --{flag}")
            except ValueError as error:
                raise SamplePromptError(f"sample_prompts line {number}: {error}") from None
        if not prompt:
            raise SamplePromptError(f"sample_prompts line {number}: no prompt before the flags")
        out.append(settings)
    return out


def _multiple_of_8(value: int, flag: str) -> int:
    if value < 8 or value % 8:
        raise ValueError(f"{flag} {value} must be a positive multiple of 8")
    return value
