"""WD v3 taggers on a tiny ONNX model in the shipped layout (model.onnx with an NHWC float32
`input`, sigmoid `output`; selected_tags.csv): thresholds per category, MCut, rating, order,
underscores, exclusions and bad model folders."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from PIL import Image

from core.paths import Paths
from preprocess import captioners
from preprocess.captioners import CaptionerError
from preprocess.captioners.wd14 import mcut_threshold
from preprocess.config import PreprocessConfig
from preprocess.testing import build_tiny_wd14

V3 = "wd-eva02-large-tagger-v3"


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# name, category, probability (the tiny graph gives sigmoid(bias) with zero weights)
TAGS = [("general", "9", 0.2), ("sensitive", "9", 0.7), ("questionable", "9", 0.05),
        ("explicit", "9", 0.01),
        ("1girl", "0", 0.97), ("long_hair", "0", 0.92), ("smile", "0", 0.5),
        ("^_^", "0", 0.45), ("(o)_(o)", "0", 0.4), ("hat", "0", 0.3), ("sky", "0", 0.1),
        ("hatsune_miku", "4", 0.9), ("kagamine_rin", "4", 0.6), ("megurine_luka", "4", 0.1)]


@pytest.fixture(autouse=True)
def fresh_models():
    captioners.unload_all()
    yield
    captioners.unload_all()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wd-v3")
    build_tiny_wd14(root / "models" / "wd14" / V3,
                    [(n, c, (0, 0, 0), logit(p)) for n, c, p in TAGS], size=48, v3=True)
    return root


def tags_of(data_dir, **options) -> list[str]:
    tagger = captioners.create("wd14", PreprocessConfig(**options), Paths(data_dir))
    return tagger.tags(Image.new("RGB", (60, 40), (10, 200, 30)))


def test_the_default_model_is_a_v3_folder_read_in_its_layout(data_dir):
    tagger = captioners.create("wd14", PreprocessConfig(), Paths(data_dir))
    assert PreprocessConfig().wd14_model == V3
    assert (tagger.input_name, tagger.size, tagger.channels_first) == ("input", 48, False)
    probs = tagger.probabilities(Image.new("RGB", (8, 8)))
    assert probs == pytest.approx([p for _, _, p in TAGS], abs=1e-6)


def test_thresholds_per_category_and_characters_first(data_dir):
    # general >= 0.35, character >= 0.85; characters first, each group by score
    assert tags_of(data_dir) == ["hatsune miku", "1girl", "long hair", "smile", "^_^",
                                 "\\(o\\)_\\(o\\)"]
    assert tags_of(data_dir, wd14_general_threshold=0.9, wd14_character_threshold=0.5) == \
        ["hatsune miku", "kagamine rin", "1girl", "long hair"]
    mixed = tags_of(data_dir, wd14_general_threshold=0.9, wd14_character_threshold=0.5,
                    wd14_character_first=False)
    assert mixed == ["1girl", "long hair", "hatsune miku", "kagamine rin"]
    assert tags_of(data_dir, wd14_general_threshold=0.9, wd14_character_threshold=0.5,
                   wd14_sort_alpha=True) == ["hatsune miku", "kagamine rin", "1girl", "long hair"]


def test_mcut_threshold_is_the_middle_of_the_largest_gap():
    assert mcut_threshold([0.1, 0.95, 0.5, 0.9, 0.45]) == pytest.approx(0.7)  # gap 0.9 -> 0.5
    assert mcut_threshold([0.3]) == 0.3
    assert mcut_threshold([]) > 1
    rng = np.random.default_rng(0)
    for _ in range(20):  # the space's formula on random probabilities
        probs = rng.random(50)
        ordered = probs[probs.argsort()[::-1]]
        t = (ordered[:-1] - ordered[1:]).argmax()
        assert mcut_threshold(probs) == pytest.approx((ordered[t] + ordered[t + 1]) / 2)


def test_mcut_per_category(data_dir):
    # general: 0.97 0.92 | 0.5 ... (largest gap 0.92 -> 0.5): only the first two
    assert tags_of(data_dir, wd14_general_mcut=True) == ["hatsune miku", "1girl", "long hair"]
    # character: 0.9 0.6 | 0.1 (gap 0.6 -> 0.1, cut at 0.35) replaces the fixed 0.85
    assert tags_of(data_dir, wd14_character_mcut=True, wd14_general_threshold=0.9) == \
        ["hatsune miku", "kagamine rin", "1girl", "long hair"]


def test_character_mcut_never_goes_below_0_15(tmp_path):
    build_tiny_wd14(tmp_path / "models/wd14/low", [
        ("general", "9", (0, 0, 0), 0.0), ("solo", "0", (0, 0, 0), logit(0.9)),
        ("a_char", "4", (0, 0, 0), logit(0.12)), ("b_char", "4", (0, 0, 0), logit(0.01))],
        v3=True)
    # MCut alone would cut at 0.065 and keep a_char (0.12); the floor of 0.15 drops it
    assert tags_of(tmp_path, wd14_model="low", wd14_character_mcut=True) == ["solo"]


def test_rating_exclusions_and_underscores(data_dir):
    assert tags_of(data_dir, wd14_rating=True)[:2] == ["sensitive", "hatsune miku"]
    excluded = tags_of(data_dir, wd14_rating=True, wd14_escape=False,
                       wd14_undesired_tags="sensitive, long hair, Hatsune_Miku, ^_^")
    assert excluded == ["1girl", "smile", "(o)_(o)"]  # no rating: the top one was excluded
    raw = tags_of(data_dir, wd14_use_spaces=False, wd14_escape=False)
    assert raw == ["hatsune_miku", "1girl", "long_hair", "smile", "^_^", "(o)_(o)"]


def test_colours_reach_the_model_in_bgr_at_its_input_size(tmp_path):
    build_tiny_wd14(tmp_path / "models/wd14/colour", [
        ("blue_sky", "0", (0.1, -0.1, -0.1), -5.0), ("red_(color)", "0", (-0.1, -0.1, 0.1), -5.0),
        ("x", "4", (0, 0, 0), -9.0)], size=24, v3=True)
    tagger = captioners.create("wd14", PreprocessConfig(wd14_model="colour"), Paths(tmp_path))
    assert tagger.size == 24
    assert tagger.caption(Image.new("RGB", (30, 30), (0, 0, 255))) == "blue sky"
    assert tagger.caption(Image.new("RGB", (30, 30), (255, 0, 0))) == "red \\(color\\)"


def test_missing_tag_list_or_model_is_named(tmp_path):
    folder = build_tiny_wd14(tmp_path / "models/wd14/part", [("solo", "0", (0, 0, 0), 1.0)],
                             v3=True)
    (folder / "selected_tags.csv").unlink()
    with pytest.raises(CaptionerError, match=r"wd14_model: .*part has no selected_tags\.csv"):
        captioners.create("wd14", PreprocessConfig(wd14_model="part"), Paths(tmp_path))
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n1,solo,0,5\n")
    (folder / "model.onnx").unlink()
    with pytest.raises(CaptionerError, match=r"wd14_model: .*part has no model\.onnx"):
        captioners.create("wd14", PreprocessConfig(wd14_model="part"), Paths(tmp_path))
    with pytest.raises(CaptionerError, match=r"wd14_model: no model found for 'nowhere'"):
        captioners.create("wd14", PreprocessConfig(wd14_model="nowhere"), Paths(tmp_path))


def test_tag_list_of_another_size_or_header_is_refused(tmp_path):
    folder = build_tiny_wd14(tmp_path / "models/wd14/mismatch",
                             [("solo", "0", (0, 0, 0), 1.0), ("hat", "0", (0, 0, 0), 1.0)], v3=True)
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n1,solo,0,5\n")
    with pytest.raises(CaptionerError, match="has 2 outputs but .*lists 1 tags"):
        captioners.create("wd14", PreprocessConfig(wd14_model="mismatch"), Paths(tmp_path))
    (folder / "selected_tags.csv").write_text("id,tag\n1,solo\n2,hat\n")
    with pytest.raises(CaptionerError, match="does not start with the header tag_id,name,category"):
        captioners.create("wd14", PreprocessConfig(wd14_model="mismatch"), Paths(tmp_path))


def test_without_onnxruntime_the_message_says_how_to_install_it(data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(CaptionerError, match="onnxruntime, which is not installed.*pip install"):
        captioners.create("wd14", PreprocessConfig(), Paths(data_dir))


def test_a_run_appends_existing_captions_and_the_editor_works_on_the_result(data_dir, tmp_path):
    from preprocess import captions_edit as ce
    from preprocess.pipeline import run

    class Ctx:
        paths = Paths(data_dir)

        def emit(self, event):
            pass

        def should_stop(self):
            return False

    source = tmp_path / "raw"
    source.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(source / "a.png")
    (source / "a.txt").write_text("sks", encoding="utf-8")
    run(PreprocessConfig(source=str(source), destination=str(tmp_path / "out"), width=64,
                         height=64, captioners=["wd14"], existing_caption="append",
                         wd14_general_threshold=0.9), Ctx())
    caption = tmp_path / "out" / "00000-0-a.txt"
    assert caption.read_text() == "hatsune miku, 1girl, long hair sks"
    ce.apply_edit(tmp_path / "out", "remove", "long_hair sks, 1girl")
    assert caption.read_text() == "hatsune miku"


def test_models_are_never_downloaded(tmp_path, monkeypatch):
    import huggingface_hub
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # as if online

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(CaptionerError, match=r"wd14_model: 'SmilingWolf/wd-vit-tagger-v3' is "
                                             r"not a local folder; put model\.onnx and "
                                             r"selected_tags\.csv in .*models/wd14/wd-vit"):
        captioners.create("wd14", PreprocessConfig(wd14_model="SmilingWolf/wd-vit-tagger-v3"),
                          Paths(tmp_path))
    with pytest.raises(CaptionerError, match=r"no model found for 'wd-vit-tagger-v3'"):
        captioners.create("wd14", PreprocessConfig(wd14_model="wd-vit-tagger-v3"),
                          Paths(tmp_path))
