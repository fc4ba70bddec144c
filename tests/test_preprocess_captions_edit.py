"""Caption editing of a dataset folder: tag operations, atomic writes, frequency table."""
from __future__ import annotations

import os

import pytest

from preprocess import captions_edit as ce
from tests.conftest import photo


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    captions = {"a": "sks dog, long_hair, smile, Long Hair",
                "b": "smile, sks dog, outdoors",
                "c": None,  # no caption file
                "d": "outdoors,, blurry ,smile"}
    for name, text in captions.items():
        photo(0, 16).save(folder / f"{name}.png")
        if text is not None:
            (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    (folder / "notes.txt").write_text("not a caption of any image")
    return folder


def read(folder, name):
    path = folder / f"{name}.txt"
    return path.read_text(encoding="utf-8") if path.exists() else None


def test_tag_list_operations():
    tags = ce.split_tags(" sks dog, long_hair,, smile, Long Hair ")
    assert tags == ["sks dog", "long_hair", "smile", "Long Hair"]
    assert ce.dedupe(tags) == ["sks dog", "long_hair", "smile"]
    assert ce.add_tags(tags, "smile, 1girl, 1girl") == tags + ["1girl"]
    assert ce.add_tags(["x"], ["new", "x"], front=True) == ["new", "x"]
    assert ce.remove_tags(tags, "long hair") == ["sks dog", "smile"]
    assert ce.replace_tag(["a", "b", "c"], "b", "beta") == ["a", "beta", "c"]
    assert ce.replace_tag(["a", "b", "c"], "b", "c") == ["a", "c"]  # already there: dropped
    assert ce.replace_tag(["a", "b", "c"], "b", "") == ["a", "c"]
    assert ce.move_to_front(["a", "b", "c", "d"], "d, zz, c") == ["d", "c", "a", "b"]
    assert ce.join_tags(["a", "b"]) == "a, b"


def test_read_captions_lists_images_only(dataset):
    captions = ce.read_captions(dataset)
    assert [p.name for p in captions] == ["a.png", "b.png", "c.png", "d.png"]
    assert captions[dataset / "c.png"] == ""


def test_remove_and_dedupe_rewrite_only_changed_files(dataset):
    untouched = os.stat(dataset / "b.txt").st_mtime_ns
    report = ce.apply_edit(dataset, "remove", "long hair")
    assert [p.name for p in report.changed] == ["a.txt"]
    assert read(dataset, "a") == "sks dog, smile"
    assert read(dataset, "d") == "outdoors,, blurry ,smile"  # untouched text kept as it was
    assert os.stat(dataset / "b.txt").st_mtime_ns == untouched
    ce.apply_edit(dataset, "remove", "blurry")
    assert read(dataset, "d") == "outdoors, smile"
    assert report.before[dataset / "a.txt"] == "sks dog, long_hair, smile, Long Hair"


def test_add_move_replace_over_a_folder(dataset):
    ce.apply_edit(dataset, "add", "masterpiece")
    assert read(dataset, "c") == "masterpiece"  # images without a caption get one
    ce.apply_edit(dataset, "move_front", "sks dog")
    assert read(dataset, "b") == "sks dog, smile, outdoors, masterpiece"
    ce.apply_edit(dataset, "replace", "smile, outdoors", replacement="grin")
    assert read(dataset, "b") == "sks dog, grin, masterpiece"
    ce.apply_edit(dataset, "add_front", "photo")
    assert read(dataset, "a").startswith("photo, sks dog")
    assert read(dataset, "notes") == "not a caption of any image"


def test_dry_run_changes_nothing(dataset):
    report = ce.apply_edit(dataset, "remove", "smile", dry_run=True)
    assert [p.name for p in report.changed] == ["a.txt", "b.txt", "d.txt"]
    assert "smile" in read(dataset, "a")


def test_unknown_action(dataset):
    with pytest.raises(ValueError, match="action"):
        ce.apply_edit(dataset, "shuffle", "x")


def test_writes_are_atomic(dataset, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ce.os, "replace", broken_replace)
    with pytest.raises(OSError):
        ce.write_caption(dataset / "a.png", "new text")
    monkeypatch.undo()
    assert read(dataset, "a") == "sks dog, long_hair, smile, Long Hair"
    assert not [p for p in dataset.iterdir() if p.name.endswith(".tmp")]
    ce.write_caption(dataset / "a.png", "new text, ü")
    assert read(dataset, "a") == "new text, ü"
    ce.write_caption(dataset / "a.png", "", remove_empty=True)
    assert read(dataset, "a") is None


def test_tag_frequency(dataset):
    table = ce.tag_frequency(dataset)
    assert table[0] == ("smile", 3)
    assert dict(table) == {"smile": 3, "sks dog": 2, "outdoors": 2, "long_hair": 1, "blurry": 1}
    assert [n for _, n in table] == sorted((n for _, n in table), reverse=True)
    assert ce.tag_frequency(["a, b", "b, B"]) == [("b", 2), ("a", 1)]
