"""Fine-tune metadata cleaning: the rules of kohya's clean_captions_and_tags, one example each."""
from __future__ import annotations

import json

import pytest

from trainers.finetune_metadata import clean_caption, clean_metadata, clean_tags, make_metadata


@pytest.mark.parametrize("tags, cleaned", [
    # one person: colours, hair and eyes say who she is, and stay
    ("1girl, blue_eyes, long_hair, blonde_hair, ponytail", "1girl, blue eyes, long hair, blonde hair, ponytail"),
    # several people: two eye colours cannot say whose, so both go
    ("2girls, blue_eyes, red_eyes, smile", "2girls, smile"),
    # one eye colour among several people is kept
    ("2girls, blue_eyes, smile", "2girls, blue eyes, smile"),
    # two hair colours go; one shared hair length stays
    ("2girls, long_hair, blonde_hair, black_hair", "2girls, long hair"),
    # two hair lengths, two hair cuts, two sleeve kinds, two hairstyles
    ("multiple girls, long hair, short hair, smile", "multiple girls, smile"),
    ("2boys, bob cut, hime cut, open mouth", "2boys, open mouth"),
    ("3girls, long sleeves, sleeveless, dress", "3girls, dress"),
    ("2girls, ponytail, side braid, ahoge, hat", "2girls, hat"),
    ("6+girls, single hair bun, side bun", "6+girls"),
    # 'girls' inside another word is no crowd
    ("1girl, girlsaurus, blue eyes, red eyes", "1girl, girlsaurus, blue eyes, red eyes"),
    # rating tags, underscores, duplicates, and a tag a more specific one ends with
    ("1girl, shirt, white_shirt, ^_^, rating:safe, 1girl", "1girl, white shirt, ^_^"),
])
def test_tag_rules(tags, cleaned):
    assert clean_tags(tags) == cleaned


@pytest.mark.parametrize("caption, cleaned", [
    ("an anime girl holding a sword", "an girl holding a sword"),  # kohya leaves the article
    ("a young woman sitting on a bench", "a girl sitting on a bench"),
    ("two cartoon women in a park", "two girls in a park"),
    ("a cartoon drawing of a lady", "a drawing of a girl"),
    ("an anime cartoon image of a person", "an image of a girl"),
    ("a cartoon anime drawing of people dancing", "a drawing of girls dancing"),
    ("an anime anime character with a female friend", "an girl with a girl friend"),
    ("a ladybug on a personal computer", "a ladybug on a personal computer"),  # whole words
    ("a girl girl with girl girl", "a girl with girl"),
])
def test_anime_caption_rules(caption, cleaned):
    assert clean_caption(caption, anime_rules=True) == cleaned


def test_caption_rules_only_when_asked(tmp_path):
    assert clean_caption("a young woman  woman") == "a young woman"  # only the general tidying
    metadata = {"a": {"caption": "a young woman", "tags": "2girls, blue_eyes, red_eyes"}}
    assert clean_metadata(metadata) == 1
    assert metadata["a"] == {"caption": "a young woman", "tags": "2girls"}
    assert clean_metadata(metadata, anime_rules=True) == 1
    assert metadata["a"]["caption"] == "a girl"

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"")
    (folder / "x.caption").write_text("a cartoon woman")
    (folder / "x.txt").write_text("2boys, black_hair, red_hair")
    out = tmp_path / "meta.json"
    make_metadata(folder, out, anime_rules=True)
    assert json.loads(out.read_text())["x"] == {"caption": "a girl", "tags": "2boys"}


def test_make_metadata_button_config_carries_the_option(tmp_path):
    from core.paths import Paths
    from trainers.configs import FineTuneConfig
    from trainers.finetune_metadata import main, make_for_config
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"")
    (folder / "x.caption").write_text("a person")
    paths = Paths(tmp_path)
    cfg = FineTuneConfig(train_data_dir=str(folder), in_json=str(tmp_path / "m.json"),
                         anime_caption_rules=True)
    assert "1 cleaned" in make_for_config(cfg, paths)
    assert json.loads((tmp_path / "m.json").read_text())["x"]["caption"] == "a girl"
    assert main([str(folder), str(tmp_path / "cli.json")]) == 0
    assert json.loads((tmp_path / "cli.json").read_text())["x"]["caption"] == "a person"
    assert main([str(folder), str(tmp_path / "cli.json"), "--anime-caption-rules"]) == 0
    assert json.loads((tmp_path / "cli.json").read_text())["x"]["caption"] == "a girl"
