"""Captioners on tiny random weights saved in the real layouts, plus the tag rules."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.paths import Paths
from preprocess import captioners
from preprocess.captioners import CaptionerError, format_tags
from preprocess.config import PreprocessConfig
from preprocess.testing import build_tiny_blip, build_tiny_deepbooru, build_tiny_wd14
from tests.conftest import photo

DB_TAGS = ["1girl", "long_hair", "rating:safe", "smile_(expression)", "cat", "a\\b"]
WD14_TABLE = [  # name, category, weights on mean (B, G, R), bias
    ("general", "9", (0, 0, 0), 2.0), ("sensitive", "9", (0, 0, 0), -2.0),
    ("questionable", "9", (0, 0, 0), -3.0), ("explicit", "9", (0, 0, 0), -4.0),
    ("blue_sky", "0", (0.1, -0.1, -0.1), -5.0), ("red_(color)", "0", (-0.1, -0.1, 0.1), -5.0),
    ("white_background", "0", (0.05, 0.05, 0.05), -30.0),
    ("^_^", "0", (0, 0, 0), 2.0), ("solo", "0", (0, 0, 0), 0.405),
    ("hatsune_miku", "4", (0, 0, 0), 0.405),  # 0.6: above 0.35, below 0.85
]


@pytest.fixture(autouse=True)
def fresh_models():
    captioners.unload_all()
    yield
    captioners.unload_all()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioner-data")
    build_tiny_deepbooru(root / "models" / "deepbooru" / "model-resnet_custom_v3.pt", DB_TAGS,
                         positive=["long_hair", "rating:safe", "smile_(expression)", "a\\b"],
                         negative=["1girl", "cat"])
    build_tiny_wd14(root / "models" / "wd14" / "wd-v1-4-convnext-tagger-v2", WD14_TABLE)
    return root


# --- tag rules ----------------------------------------------------------------------------------

SCORES = {"long_hair": 0.9, "smile": 0.6, "rating:safe": 0.99, "blue_(sky)": 0.7, "cat": 0.49,
          "a_b\\c": 0.5}


def test_threshold_keeps_tags_at_or_above_and_drops_ratings():
    tags = format_tags(SCORES, 0.5, use_spaces=False, escape=False)
    assert set(tags) == {"long_hair", "smile", "blue_(sky)", "a_b\\c"}
    assert format_tags(SCORES, 0.8, use_spaces=False, escape=False) == ["long_hair"]
    assert "rating:safe" in format_tags(SCORES, 0.5, drop_rating=False, escape=False,
                                        use_spaces=False)


def test_sorting_alphabetical_or_by_score():
    assert format_tags(SCORES, 0.5, sort_alpha=True, use_spaces=False, escape=False) == \
        sorted(["long_hair", "smile", "blue_(sky)", "a_b\\c"])
    assert format_tags(SCORES, 0.5, sort_alpha=False, use_spaces=False, escape=False) == \
        ["long_hair", "blue_(sky)", "smile", "a_b\\c"]


def test_spaces_escaping_and_filters():
    tags = format_tags(SCORES, 0.5, sort_alpha=False, use_spaces=True, escape=True)
    assert tags == ["long hair", "blue \\(sky\\)", "smile", "a b\\\\c"]
    # filter tags are typed with spaces or underscores and match the raw tag
    tags = format_tags(SCORES, 0.5, exclude=captioners.parse_tag_list(" long hair , smile"))
    assert tags == ["a b\\\\c", "blue \\(sky\\)"]
    assert format_tags({"^_^": 0.9, "long_hair": 0.9}, 0.5, keep_kaomoji=True) == \
        ["^_^", "long hair"]


def test_registry_names_and_unknown_captioner():
    assert captioners.names() == ["blip", "deepbooru", "wd14", "vlm"]
    with pytest.raises(CaptionerError, match="unknown captioner 'clip'"):
        captioners.create("clip", PreprocessConfig(), None)


# --- DeepDanbooru -------------------------------------------------------------------------------

def test_deepbooru_full_size_layout_matches_the_published_weights():
    import torch
    from preprocess.captioners.deepbooru_model import DeepDanbooruModel
    with torch.device("meta"):
        model = DeepDanbooruModel()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 179 * 2 - 1
    expected = {  # from A1111's modules/deepbooru_model.py
        "n_Conv_0.weight": (64, 3, 7, 7), "n_Conv_0.bias": (64,),
        "n_Conv_1.weight": (256, 64, 1, 1), "n_Conv_3.weight": (64, 64, 3, 3),
        "n_Conv_11.weight": (512, 256, 1, 1), "n_Conv_13.weight": (128, 128, 3, 3),
        "n_Conv_36.weight": (1024, 512, 1, 1), "n_Conv_97.weight": (256, 1024, 1, 1),
        "n_Conv_99.weight": (1024, 256, 1, 1), "n_Conv_100.weight": (1024, 1024, 1, 1),
        "n_Conv_158.weight": (2048, 1024, 1, 1), "n_Conv_160.weight": (512, 512, 3, 3),
        "n_Conv_168.weight": (4096, 2048, 1, 1), "n_Conv_170.weight": (1024, 1024, 3, 3),
        "n_Conv_177.weight": (4096, 1024, 1, 1), "n_Conv_177.bias": (4096,),
        "n_Conv_178.weight": (9176, 4096, 1, 1),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "n_Conv_178.bias" not in shapes
    strides = {i: getattr(model, f"n_Conv_{i}").stride for i in (0, 1, 11, 13, 98, 100, 170)}
    assert strides == {0: (2, 2), 1: (1, 1), 11: (2, 2), 13: (2, 2), 98: (2, 2),
                       100: (2, 2), 170: (2, 2)}


def test_deepbooru_tiny_weights_load_by_key_and_tag(data_dir):
    import torch
    state = torch.load(data_dir / "models/deepbooru/model-resnet_custom_v3.pt",
                       weights_only=True)
    assert state["tags"] == DB_TAGS
    assert state["n_Conv_178.weight"].shape[0] == len(DB_TAGS)
    cfg = PreprocessConfig()
    tagger = captioners.create("deepbooru", cfg, Paths(data_dir))
    assert tagger.model.tags == DB_TAGS
    scores = tagger.scores(photo(0, 100).resize((120, 80)))
    assert set(scores) == set(DB_TAGS)
    for tag in ("long_hair", "rating:safe", "smile_(expression)", "a\\b"):
        assert scores[tag] >= 0.5
    for tag in ("1girl", "cat"):
        assert scores[tag] <= 0.5
    caption = tagger.caption(photo(0, 100))
    # alphabetical by raw tag, spaces, escaped brackets and backslashes, no rating
    assert caption == "a\\\\b, long hair, smile \\(expression\\)"


def test_deepbooru_options_and_single_load(data_dir):
    cfg = PreprocessConfig(deepbooru_sort_alpha=False, deepbooru_use_spaces=False,
                           deepbooru_escape=False, deepbooru_filter_tags="a\\b")
    first = captioners.create("deepbooru", cfg, Paths(data_dir))
    second = captioners.create("deepbooru", PreprocessConfig(), Paths(data_dir))
    assert first.model is second.model and len(captioners.loaded()) == 1
    image = photo(1, 96)
    scores = first.scores(image)
    expected = sorted(["long_hair", "smile_(expression)"], key=lambda t: -scores[t])
    assert first.caption(image) == ", ".join(expected)


def test_deepbooru_missing_model_names_where_it_looked(tmp_path):
    with pytest.raises(CaptionerError, match=r"deepbooru_model.*models/deepbooru"):
        captioners.create("deepbooru", PreprocessConfig(), Paths(tmp_path))


# --- WD14 ---------------------------------------------------------------------------------------

def test_wd14_reads_bgr_thresholds_and_formats(data_dir):
    tagger = captioners.create("wd14", PreprocessConfig(wd14_model="wd-v1-4-convnext-tagger-v2"),
                               Paths(data_dir))
    assert tagger.size == 32 and tagger.input_name == "input_1:0"
    blue = tagger.caption(Image.new("RGB", (50, 50), (0, 0, 255)))
    red = tagger.caption(Image.new("RGB", (50, 50), (255, 0, 0)))
    # by score: ^_^ (0.88) then solo (0.6); hatsune_miku (0.6) is below 0.85
    assert blue.split(", ") == ["blue sky", "^_^", "solo"]
    assert red.split(", ") == ["red \\(color\\)", "^_^", "solo"]


def test_wd14_pads_to_a_white_square():
    from preprocess.captioners.wd14 import prepare
    batch = prepare(Image.new("RGB", (40, 10), (0, 0, 0)), 20)
    assert batch.shape == (1, 20, 20, 3) and batch.dtype == np.float32
    assert (batch[0, :6] == 255).all() and (batch[0, -6:] == 255).all()  # white bands
    assert (batch[0, 8:12] == 0).all()  # the black image in the middle
    coloured = prepare(Image.new("RGB", (8, 8), (10, 20, 30)), 8)
    assert tuple(coloured[0, 0, 0]) == (30, 20, 10)  # BGR


def test_wd14_options(data_dir):
    cfg = PreprocessConfig(wd14_model="wd-v1-4-convnext-tagger-v2",
                           wd14_character_threshold=0.5, wd14_general_threshold=0.7,
                           wd14_undesired_tags="^_^", wd14_sort_alpha=True,
                           wd14_use_spaces=False, wd14_escape=False, wd14_rating=True,
                           wd14_character_first=False)
    tagger = captioners.create("wd14", cfg, Paths(data_dir))
    caption = tagger.caption(Image.new("RGB", (32, 32), (0, 0, 255)))
    assert caption.split(", ") == ["general", "blue_sky", "hatsune_miku"]


def test_wd14_rejects_a_tag_table_of_the_wrong_length(tmp_path):
    build_tiny_wd14(tmp_path / "models/wd14/broken", WD14_TABLE)
    with open(tmp_path / "models/wd14/broken/selected_tags.csv", "a", encoding="utf-8") as f:
        f.write("9999,extra,0,1\n")
    with pytest.raises(CaptionerError, match="11 tags"):
        captioners.create("wd14", PreprocessConfig(wd14_model="broken"), Paths(tmp_path))


# --- BLIP ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip-data")
    build_tiny_blip(root / "models" / "BLIP")
    return root


def test_blip_tiny_model_captions_with_its_vocabulary(blip_dir):
    from preprocess.testing import BLIP_WORDS
    cfg = PreprocessConfig(blip_min_length=6, blip_max_length=10, blip_num_beams=2)
    blip = captioners.create("blip", cfg, Paths(blip_dir))
    assert blip.size == 32 and (blip.num_beams, blip.min_length, blip.max_length) == (2, 6, 10)
    image = photo(0, 64)
    caption = blip.caption(image)
    words = caption.split()
    assert words and set(words) <= set(BLIP_WORDS)
    # the decoder starts from [DEC] "a picture of" (4 tokens): at most 6 more words
    assert 2 <= len(words) <= 6
    assert caption == blip.caption(image)  # deterministic (no sampling)
    longer = captioners.create("blip", PreprocessConfig(blip_min_length=14, blip_max_length=16),
                               Paths(blip_dir))
    assert longer.model is blip.model
    assert len(longer.caption(image).split()) >= 8


def test_blip_pixels_are_normalised_without_torchvision(blip_dir):
    import sys
    blip = captioners.create("blip", PreprocessConfig(), Paths(blip_dir))
    white = blip.pixels(Image.new("RGB", (50, 70), (255, 255, 255)))
    assert tuple(white.shape) == (1, 3, 32, 32)
    expected = (1 - np.array(captioners.blip.CLIP_MEAN)) / np.array(captioners.blip.CLIP_STD)
    assert np.allclose(white[0, :, 0, 0].numpy(), expected, atol=1e-5)
    assert "torchvision" not in sys.modules


def test_blip_strips_the_prompt():
    from preprocess.captioners.blip import strip_prompt
    assert strip_prompt("a picture of  a cat on a mat", "a picture of") == "a cat on a mat"
    assert strip_prompt("two dogs", "a picture of") == "two dogs"


def test_model_lookup_prefers_local_folders_then_the_hub_when_online(tmp_path, monkeypatch):
    from preprocess.captioners import HubModel, find_model
    paths = Paths(tmp_path)
    (tmp_path / "models" / "wd14" / "mine").mkdir(parents=True)
    is_model = lambda p: p.is_dir()  # noqa: E731
    kwargs = dict(field="wd14_model", subdir="wd14", is_model=is_model, expects="a folder",
                  hub_default="SmilingWolf/mine2")
    assert find_model(paths, "mine", **kwargs) == tmp_path / "models" / "wd14" / "mine"
    assert find_model(paths, str(tmp_path / "models"), **kwargs) == tmp_path / "models"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaptionerError, match=r"wd14_model: no model found for 'mine2'"):
        find_model(paths, "mine2", **kwargs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    found = find_model(paths, "mine2", **kwargs)
    assert isinstance(found, HubModel) and found == "SmilingWolf/mine2"
    assert tmp_path / "models" / "wd14" / "mine2" in found.looked
    assert find_model(paths, "owner/other", **kwargs) == "owner/other"
    with pytest.raises(CaptionerError, match="outside the data folder"):
        find_model(Paths(tmp_path, confine=True), "/etc", **kwargs)
