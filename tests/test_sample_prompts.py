import pytest

from trainers.sample_prompts import SamplePromptError, parse_sample_prompts
from trainers.sampling import PreviewSettings

DEFAULTS = PreviewSettings(prompt="", seed=42, steps=20, cfg=7.0, width=512, height=512)


def test_flags_override_defaults():
    text = ("# a comment\n\n"
            "a photo of sks dog --n blurry, low quality --w 768 --h 512 --d 7 --l 5.5 --s 12\n"
            "a cat")
    first, second = parse_sample_prompts(text, DEFAULTS)
    assert (first.prompt, first.negative, first.width, first.height, first.seed, first.cfg, first.steps) == \
        ("a photo of sks dog", "blurry, low quality", 768, 512, 7, 5.5, 12)
    assert (second.prompt, second.seed, second.width) == ("a cat", 42, 512)


@pytest.mark.parametrize("line, words", [
    ("x --w 100", "multiple of 8"),
    ("x --d abc", "line 1"),
    ("x --q 3", "unknown flag --q"),
    ("--n only negative", "no prompt"),
])
def test_bad_lines_are_named(line, words):
    with pytest.raises(SamplePromptError, match=words):
        parse_sample_prompts(line, DEFAULTS)
