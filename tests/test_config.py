import tomllib

import pytest

from core.config import ConfigError, from_dict, load_toml, parse_override, to_toml
from trainers.configs import CreateEmbeddingConfig, TextualInversionConfig


def test_commented_toml_round_trips():
    cfg = TextualInversionConfig(model="tiny-demo", embedding="x", data_root="d", steps=7,
                                 learn_rate="0.1:3, 0.01")
    text = to_toml(cfg)
    assert "# Learning rate or schedule" in text
    assert from_dict(TextualInversionConfig, tomllib.loads(text)) == cfg


def test_overrides_and_types(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('embedding = "a"\nsteps = 10\n')
    cfg = load_toml(TextualInversionConfig, path, ["steps=20", "learn_rate=0.5:3, 0.1",
                                                   "shuffle_tags=true", "preview_cfg=5"])
    assert (cfg.steps, cfg.learn_rate, cfg.shuffle_tags, cfg.preview_cfg) == (20, "0.5:3, 0.1", True, 5.0)
    assert parse_override("a=b c") == ("a", "b c")


@pytest.mark.parametrize("data, words", [
    ({"stepz": 3}, "stepz: unknown setting"),
    ({"steps": "many"}, "steps: expected int"),
    ({"steps": 2.5}, "steps: expected int"),
    ({"preview_cfg": "nan"}, "preview_cfg: expected float"),
    ({"shuffle_tags": "perhaps"}, "shuffle_tags: expected bool"),
    ({"embedding": ["a"]}, "embedding: expected str"),
])
def test_wrong_keys_and_types_name_the_key(data, words):
    with pytest.raises(ConfigError, match=words):
        from_dict(TextualInversionConfig, data)


def test_limits_and_choices():
    cfg = TextualInversionConfig(model="m", embedding="e", data_root="d", width=100,
                                 latent_sampling="sometimes", tag_drop_out=2.0)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    text = str(info.value)
    assert "width: must be a multiple of 8" in text
    assert "latent_sampling" in text and "tag_drop_out: must be at most 1.0" in text


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(TextualInversionConfig, tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(TextualInversionConfig, bad)


@pytest.mark.parametrize("name", ["a/b", "..", ".hidden", "c:d", "x\\y", "", "a" * 200])
def test_embedding_names_with_path_characters_are_refused(name):
    with pytest.raises(ConfigError, match="name"):
        CreateEmbeddingConfig(name=name, model="tiny-demo").validate()


def test_vectors_per_token_range():
    with pytest.raises(ConfigError, match="vectors_per_token"):
        CreateEmbeddingConfig(name="a", model="m", vectors_per_token=76).validate()
