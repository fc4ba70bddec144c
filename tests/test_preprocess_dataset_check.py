"""The dataset check on real photos: sizes, near-duplicates, missing / empty / long captions,
unreadable files, tag frequency, both folder layouts, the CLI, and bad input named."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from preprocess.dataset_check import (REPEATS_FOLDER, check_dataset, dhash, duplicate_groups,
                                      load_tokenizer, count_tokens)
from tests.conftest import photo

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(["zebra"] * 90)  # 90 tokens: over 75, under 150


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flat")
    photo(0, 600).save(folder / "astronaut.png")
    (folder / "astronaut.txt").write_text("1girl, solo, space suit")
    photo(0, 560).save(folder / "astronaut-copy.jpg", quality=80)   # the same photo again
    (folder / "astronaut-copy.txt").write_text("1girl, Solo")
    photo(1, 100).save(folder / "coffee.png")                       # 100 x 100: too small
    (folder / "coffee.txt").write_text("cup, solo")
    photo(2, 640).save(folder / "cat.png")                          # no caption file
    photo(3, 640).save(folder / "rocket.png")
    (folder / "rocket.txt").write_text("  \n")                      # an empty caption
    photo(4, 640).save(folder / "camera.png")
    (folder / "camera.txt").write_text(LONG)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def test_each_check_names_its_files(flat):
    report = check_dataset(flat, resolution=512, max_token_length=75)
    assert report.layout == "flat" and report.images == 7
    assert report.too_small == [("coffee.png", 100, 100)]
    assert report.duplicates == [["astronaut-copy.jpg", "astronaut.png"]]
    assert report.missing_captions == ["cat.png"]
    assert report.empty_captions == ["rocket.png"]
    assert report.long_captions == [("camera.png", 90)]
    assert [name for name, _ in report.unreadable] == ["broken.jpg"]
    # tags counted once per caption, case-insensitively, most frequent first
    assert report.top_tags[:3] == [("solo", 3), ("1girl", 2), ("cup", 1)]  # then space suit, ...


def test_limits_follow_the_settings(flat):
    report = check_dataset(flat, resolution=(96, 96), max_token_length=150, top=1)
    assert report.too_small == [] and report.long_captions == []
    assert report.top_tags == [("solo", 3)]
    strict = check_dataset(flat, resolution=(640, 640))  # 600 x 600 is smaller in area
    assert [name for name, _, _ in strict.too_small] == ["astronaut-copy.jpg", "astronaut.png",
                                                         "coffee.png"]


def test_the_text_gives_counts_and_names(flat):
    report = check_dataset(flat)
    text = report.text()
    assert text.startswith(f"Dataset check of {flat} (flat folder): 7 images, 6 kinds")
    for piece in ["1 image smaller than 512x512", "coffee.png (100x100)",
                  "1 group of near-duplicate images", "astronaut-copy.jpg = astronaut.png",
                  "1 image without a caption file", "cat.png", "1 caption file empty: rocket.png",
                  "1 caption longer than 75 tokens", "camera.png (90 tokens)",
                  "1 file cannot be read: broken.jpg", "Most frequent tags: solo (3), 1girl (2)"]:
        assert piece in text, piece
    assert report.summary() == ("1 unreadable, 1 too small, 1 duplicate groups, "
                                "1 without caption, 1 empty captions, 1 over 75 tokens")


def test_a_clean_folder_has_no_findings(tmp_path):
    for i in range(3):
        photo(i, 512).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"photo, subject {i}")
    report = check_dataset(tmp_path)
    assert report.findings() == [] and "no problems found" in report.text()
    (tmp_path / "0.txt").write_text("")
    assert "3 images, 1 kind of problem." in check_dataset(tmp_path).text()


def test_kohya_repeats_folders(tmp_path):
    (tmp_path / "10_sks dog").mkdir()
    (tmp_path / "2_cat").mkdir()
    (tmp_path / "notes").mkdir()
    photo(0, 512).save(tmp_path / "10_sks dog" / "a.png")
    (tmp_path / "10_sks dog" / "a.txt").write_text("sks dog, grass")
    photo(1, 512).save(tmp_path / "2_cat" / "b.png")
    photo(2, 512).save(tmp_path / "loose.png")
    report = check_dataset(tmp_path)
    assert report.layout == "kohya" and report.images == 2
    assert report.missing_captions == ["2_cat/b.png"]
    assert report.not_trained == ["loose.png"]
    assert "beside the <repeats>_<tokens> folders, not trained: loose.png" in report.text()


def test_repeats_folder_rule_matches_the_trainers():
    from trainers.kohya_data import parse_folder_name
    for name in ["20_sks dog", "1_x", "3_", "05_a_b"]:
        assert REPEATS_FOLDER.match(name) and parse_folder_name(name)[0] > 0
    for name in ["sks dog", "x_20", "_1"]:
        assert not REPEATS_FOLDER.match(name)
        with pytest.raises(ValueError):
            parse_folder_name(name)


def test_dhash_and_grouping():
    same = dhash(photo(2, 300))
    assert same.shape == (64,) and same.dtype == bool
    assert (dhash(photo(2, 123)) != same).sum() <= 4       # resized: nearly the same bits
    assert (dhash(photo(3, 300)) != same).sum() > 16       # another photo: far
    a = np.zeros(64, bool)
    b, c, d = a.copy(), a.copy(), ~a
    b[:3] = True          # a-b: 3 bits apart
    c[:6] = True          # b-c: 3 bits, a-c: 6 bits: joined through b
    assert duplicate_groups({"a": a, "b": b, "c": c, "d": d}, max_distance=4) == [["a", "b", "c"]]
    assert duplicate_groups({"a": a, "c": c}, max_distance=4) == []


def test_tokens_counted_with_a_model_tokenizer_folder(flat, tmp_path):
    from core.clip_vocab import write_clip_tokenizer
    model = tmp_path / "model"
    write_clip_tokenizer(model / "tokenizer")
    shipped = load_tokenizer("")
    assert count_tokens(shipped, LONG) == 90 and count_tokens(shipped, "1girl, solo") == 4
    from transformers import CLIPTokenizer
    own = CLIPTokenizer.from_pretrained(model / "tokenizer")
    for text in ["red_(color), ^_^, long hair", LONG, "a photo of sks dog"]:  # less BOS and EOS
        assert count_tokens(shipped, text) == len(own(text).input_ids) - 2
    report = check_dataset(flat, tokenizer=model)
    assert report.long_captions == [("camera.png", 90)]


@pytest.mark.parametrize("kwargs, field", [
    (dict(folder="missing"), "folder: .*does not exist"),
    (dict(max_token_length=100), "max_token_length: choose 75, 150 or 225"),
    (dict(resolution=0), "resolution: must be positive"),
    (dict(caption_extension="txt"), "caption_extension"),
    (dict(tokenizer="nowhere"), "tokenizer: nowhere holds no CLIP tokenizer"),
])
def test_bad_input_is_named(tmp_path, kwargs, field):
    kwargs.setdefault("folder", tmp_path)
    if kwargs["folder"] == "missing":
        kwargs["folder"] = tmp_path / "missing"
    with pytest.raises(ValueError, match=field):
        check_dataset(**kwargs)


def test_cli_check(flat, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "preprocess", "check", str(flat),
                           "--resolution", "512", "--max-token-length", "150"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 image smaller than 512x512" in done.stdout
    assert "longer than" not in done.stdout
    bad = subprocess.run([sys.executable, "-m", "preprocess", "check", str(tmp_path / "none")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "folder:" in bad.stderr and "does not exist" in bad.stderr
