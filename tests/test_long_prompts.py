"""Long captions (max_token_length 150 / 225): 75-token chunks, A1111's and kohya's joins, and
every method training on the whole caption."""
from __future__ import annotations

import contextlib

import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, photo
from tests.test_textual_inversion import make_embedding, ti_config
from trainers.configs import (DreamBoothConfig, HypernetworkTrainingConfig, LoraConfig,
                              TextualInversionConfig)
from trainers.formats.embedding import load_embedding
from trainers.models import load_model
from trainers.prompts import PromptEncoder

LONG = "word " * 90  # 90 tokens: one more chunk is needed past 75


def encoder(model, **kw):
    return PromptEncoder(model.tokenizer, model.text_encoder, **kw)


def test_tokens_past_75_change_the_conditioning_only_when_allowed(data_paths):
    model = load_model(data_paths, "tiny-demo")
    red, blue = LONG + "red", LONG + "blue"
    with torch.no_grad():
        short = encoder(model).encode([red, blue])
        assert short.shape[1] == 77 and torch.equal(short[0], short[1])  # truncated alike
        for style, length in (("a1111", 154), ("kohya", 152)):
            both = encoder(model, max_tokens=150, chunking=style).encode([red, blue])
            assert both.shape[1] == length, style
            assert not torch.allclose(both[0], both[1]), style
        assert encoder(model, max_tokens=225, chunking="kohya").encode([red]).shape[1] == 227
        # A1111 uses as many chunks as the batch needs; kohya always max_token_length / 75
        assert encoder(model, max_tokens=225).encode(["a cat"]).shape[1] == 77
        assert encoder(model, max_tokens=150, chunking="kohya").encode(["a cat"]).shape[1] == 152


def test_chunks_are_encoded_separately_and_joined_like_a1111_and_kohya(data_paths):
    model = load_model(data_paths, "tiny-demo")
    tok = model.tokenizer
    ids = tok(LONG + "red cat", add_special_tokens=False).input_ids
    bos, eos = tok.bos_token_id, tok.eos_token_id
    first = [bos] + ids[:75] + [eos]
    second = [bos] + ids[75:] + [eos] * (77 - 1 - len(ids[75:]))
    with torch.no_grad():
        states = model.text_encoder(torch.tensor([first, second]))[0]
        a1111 = encoder(model, max_tokens=150).encode([LONG + "red cat"])[0]
        kohya = encoder(model, max_tokens=150, chunking="kohya").encode([LONG + "red cat"])[0]
    assert torch.allclose(a1111, torch.cat([states[0], states[1]]), atol=1e-5)
    # kohya keeps the first BOS, the 75 token states of each chunk and the last EOS
    expected = torch.cat([states[0, :1], states[0, 1:76], states[1, 1:76], states[1, 76:]])
    assert torch.allclose(kohya, expected, atol=1e-5)


def test_a1111_breaks_after_a_near_comma_and_never_splits_an_embedding(data_paths):
    model = load_model(data_paths, "tiny-demo")
    comma = model.tokenizer.convert_tokens_to_ids(",</w>")
    text = "word " * 70 + ", red cat dog bird fish"  # the comma is the 71st token
    ids, _ = encoder(model, max_tokens=150).tokenize(text)
    assert ids[71] == comma and ids[72] == model.tokenizer.eos_token_id  # chunk 1 ends at the comma
    assert model.tokenizer.decode(ids[78:83]) == "red cat dog bird fish"
    kohya_ids, _ = encoder(model, max_tokens=150, chunking="kohya").tokenize(text)
    # kohya cuts at exactly 75 tokens
    assert model.tokenizer.decode(kohya_ids[72:76]) == "red cat dog bird"
    assert model.tokenizer.decode(kohya_ids[78:79]) == "fish"

    vectors = torch.randn(4, model.text_encoder.config.hidden_size)
    with_embedding = encoder(model, embeddings={"zxqtok": vectors}, max_tokens=150)
    ids, splices = with_embedding.tokenize("word " * 73 + "zxqtok")
    assert [(pos, v.shape[0]) for pos, v in splices] == [(77 + 1, 4)]  # moved whole to chunk 2
    spliced = with_embedding.encode(["word " * 73 + "zxqtok"])
    assert spliced.shape[1] == 154


def test_unsupported_lengths_are_refused_everywhere(tmp_path):
    for cls, extra in ((TextualInversionConfig, {"embedding": "e"}),
                       (HypernetworkTrainingConfig, {"hypernetwork": "h"})):
        with pytest.raises(ConfigError, match=r"max_token_length: 100 is not one of 75, 150, 225"):
            cls(model="tiny-demo", data_root=str(tmp_path), max_token_length=100, **extra).validate()
    for cls in (LoraConfig, DreamBoothConfig):
        with pytest.raises(ConfigError, match=r"max_token_length: 100 is not one of"):
            cls(model="tiny-demo", output_name="x", train_data_dir=str(tmp_path),
                max_token_length=100).validate()
    with pytest.raises(ValueError, match="max_tokens"):
        PromptEncoder(None, None, max_tokens=100)


@contextlib.contextmanager
def context_lengths(unet):
    """Record the sequence length of every conditioning the U-Net sees."""
    seen = []

    def hook(module, args, kwargs):
        context = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        seen.append(context.shape[1])
    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def long_dataset(folder, tail: str):
    folder.mkdir(parents=True)
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(LONG + tail)
    return folder


def test_textual_inversion_learns_from_the_tokens_past_75(data_paths, tmp_path):
    """Two datasets whose captions differ only after token 90: the same run trains the same
    embedding at 75 tokens (truncated) and different ones at 150."""
    model = load_model(data_paths, "tiny-demo")
    results = {}
    for tail in ("red", "blue"):
        folder = long_dataset(tmp_path / tail, tail)
        for length in (75, 150):
            path = make_embedding(data_paths, name=f"e{tail}{length}")
            with context_lengths(model.unet) as seen:
                from trainers.methods.textual_inversion import run
                run(ti_config(folder, embedding=path.stem, steps=2, template="long.txt",
                              max_token_length=length, learn_rate="0.05", width=32, height=32,
                              latent_sampling="deterministic"), RecordingContext(data_paths))
            assert set(seen) == {77 if length == 75 else 154}
            results[tail, length] = load_embedding(path).vectors
    assert torch.equal(results["red", 75], results["blue", 75])
    assert not torch.allclose(results["red", 150], results["blue", 150])


def test_hypernetwork_lora_and_dreambooth_train_on_long_captions(data_paths, tmp_path):
    from tests.test_dreambooth import db_config
    from tests.test_hypernetwork_training import hn_config, make
    from tests.test_lora_training import lora_config
    from trainers.formats.lora import read_lora_metadata
    from trainers.methods import dreambooth, hypernetwork, lora
    model = load_model(data_paths, "tiny-demo")
    folder = long_dataset(tmp_path / "plain", "red")
    kohya = tmp_path / "kohya"
    long_dataset(kohya / "1_zxq cat", "red")

    make(data_paths)
    with context_lengths(model.unet) as seen:
        hypernetwork.run(hn_config(folder, steps=1, max_token_length=225, template="long.txt"),
                         RecordingContext(data_paths))
    assert seen == [154]  # A1111: the chunks this caption needs, up to three
    with context_lengths(model.unet) as seen:
        path = lora.run(lora_config(kohya, max_train_steps=1, max_token_length=150),
                        RecordingContext(data_paths))
    assert seen == [152]
    assert read_lora_metadata(path)["ss_max_token_length"] == "150"
    with context_lengths(model.unet) as seen:
        dreambooth.run(db_config(kohya, max_train_steps=1, max_token_length=225),
                       RecordingContext(data_paths))
    assert seen == [227]


@pytest.fixture(autouse=True)
def long_template(data_paths):
    """The data folder's own templates (never the repository's)."""
    import shutil
    from core.paths import REPO_DIR
    own = data_paths.data_dir / "textual_inversion_templates"
    shutil.copytree(REPO_DIR / "textual_inversion_templates", own)
    (own / "long.txt").write_text("[name] [filewords]\n")


def test_cli_and_form_name_an_unsupported_length(tmp_path):
    from tests.test_cli_and_app import run as cli
    from webui.forms import to_config
    out = cli(["-m", "trainers", "lora", "--set", "max_token_length=100"])
    assert out.returncode == 2 and "max_token_length: 100 is not one of 75, 150, 225" in out.stderr
    printed = cli(["-m", "trainers", "dreambooth", "--print-config"])
    assert "max_token_length = 75" in printed.stdout
    with pytest.raises(ConfigError, match="max_token_length"):
        to_config(TextualInversionConfig, ["model", "embedding", "data_root", "max_token_length"],
                  ["tiny-demo", "e", str(tmp_path), 100.0])
    cfg = to_config(TextualInversionConfig, ["model", "embedding", "data_root", "max_token_length"],
                    ["tiny-demo", "e", str(tmp_path), 150.0])
    assert cfg.max_token_length == 150
