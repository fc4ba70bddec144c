import random

import pytest

from trainers.captions import TemplateError, filewords_for, make_prompt, read_template


def test_caption_file_wins(tmp_path):
    image = tmp_path / "001-a red car.png"
    image.write_bytes(b"")
    image.with_suffix(".txt").write_text("  blue boat, sea \n")
    assert filewords_for(image) == "blue boat, sea"


@pytest.mark.parametrize("name, expected", [
    ("00012-a red car.png", "a red car"),
    ("1-2-3 dog.jpg", "dog"),
    ("-5 cat.png", "cat"),
    ("cat 123.png", "cat 123"),
])
def test_file_name_minus_numeric_prefix(tmp_path, name, expected):
    assert filewords_for(tmp_path / name) == expected


def test_word_regex_and_join_string(tmp_path):
    assert filewords_for(tmp_path / "07-red_car (copy).png", r"[a-z]+", ", ") == "red, car, copy"
    assert filewords_for(tmp_path / "07-red_car.png", r"[a-z]+") == "red car"


def test_template_placeholders():
    prompt = make_prompt(["a photo of [name], [filewords]"], "mytok", "red,car", random.Random(0))
    assert prompt == "a photo of mytok, red,car"


def test_tag_dropout_and_shuffle_keep_only_given_tags():
    tags = ",".join(f"t{i}" for i in range(20))
    out = make_prompt(["[filewords]"], "x", tags, random.Random(1), shuffle_tags=True, tag_drop_out=0.5)
    kept = out.split(",")
    assert set(kept) < set(tags.split(","))
    assert 0 < len(kept) < 20
    assert make_prompt(["[filewords]"], "x", tags, random.Random(1), tag_drop_out=1.0) == ""


def test_unknown_template_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x [name]\n\n")
    assert read_template(tmp_path, "a.txt") == ["x [name]"]
    with pytest.raises(TemplateError, match="known: a.txt"):
        read_template(tmp_path, "b.txt")
    with pytest.raises(TemplateError):
        read_template(tmp_path, "../a.txt")
