"""Long captions (max_token_length 150 / 225) on the tiny SDXL model: each encoder's chunks are
joined as A1111 (TI, hypernetworks) or kohya's sdxl trainers (LoRA, DreamBooth) join them, the two
encoders' joined states side by side, the pooled projection from the first chunk."""
from __future__ import annotations

import pytest
import torch

from core.events import Preview
from tests.conftest import RecordingContext, photo
from tests.test_long_prompts import LONG, context_lengths
from trainers.conditioning import SdxlPromptEncoder
from trainers.models import load_model

SDXL = "tiny-demo-sdxl"


def test_tokens_past_75_reach_the_sdxl_conditioning(family_paths):
    model = load_model(family_paths, SDXL)
    red, blue = LONG + "red", LONG + "blue"
    with torch.no_grad():
        short = SdxlPromptEncoder(model).encode([red, blue])
        assert short.context.shape == (2, 77, 80) and torch.equal(short.context[0], short.context[1])
        for style, length in (("a1111", 154), ("kohya", 152)):
            both = SdxlPromptEncoder(model, max_tokens=150, chunking=style).encode([red, blue])
            assert both.context.shape == (2, length, 80), style  # 2 x 77 joined
            assert not torch.allclose(both.context[0], both.context[1]), style
            # the pooled projection is the first chunk's: what the truncated caption gives
            assert torch.allclose(both.pooled, short.pooled, atol=1e-5), style
        kohya = SdxlPromptEncoder(model, max_tokens=225, chunking="kohya")
        assert kohya.encode(["a cat"]).context.shape == (1, 227, 80)
        assert SdxlPromptEncoder(model, max_tokens=225).encode(["a cat"]).context.shape == (1, 77, 80)


def test_each_encoder_is_chunked_and_joined_before_the_two_are_put_side_by_side(family_paths):
    model = load_model(family_paths, SDXL)
    text = LONG + "red cat"
    with torch.no_grad():
        a1111 = SdxlPromptEncoder(model, max_tokens=150).encode([text]).context[0]
        kohya = SdxlPromptEncoder(model, max_tokens=150, chunking="kohya").encode([text]).context[0]
        halves = []
        for tok, te in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
            ids = tok(text, add_special_tokens=False).input_ids
            bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
            rows = [[bos] + ids[:75] + [eos], [bos] + ids[75:] + [eos]]
            rows[1] += [pad] * (77 - len(rows[1]))
            halves.append(te(torch.tensor(rows), output_hidden_states=True).hidden_states[-2])
    expected = torch.cat([torch.cat([h[0], h[1]]) for h in halves], dim=-1)
    assert torch.allclose(a1111, expected, atol=1e-5)
    inner = [torch.cat([h[0, :1], h[0, 1:76], h[1, 1:76], h[1, 76:]]) for h in halves]
    assert torch.allclose(kohya, torch.cat(inner, dim=-1), atol=1e-5)


@pytest.fixture
def long_captions(tmp_path):
    folder = tmp_path / "train" / "1_zxq cat"
    folder.mkdir(parents=True)
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(LONG + "red")
    return folder


def test_sdxl_trains_on_150_token_captions_without_truncation(family_paths, long_captions):
    from trainers.configs import (CreateEmbeddingConfig, CreateHypernetworkConfig,
                                  HypernetworkTrainingConfig, LoraConfig, TextualInversionConfig)
    from trainers.embeddings import create_embedding
    from trainers.formats.lora import read_lora_metadata
    from trainers.hypernetworks import create_hypernetwork
    from trainers.methods import hypernetwork, lora, textual_inversion
    model = load_model(family_paths, SDXL)
    import shutil
    from core.paths import REPO_DIR
    own = family_paths.data_dir / "textual_inversion_templates"  # never the repository's
    shutil.copytree(REPO_DIR / "textual_inversion_templates", own)
    (own / "long.txt").write_text("[name] [filewords]\n")
    create_embedding(CreateEmbeddingConfig(name="zxqlong", init_text="cat", model=SDXL,
                                           file_format="safetensors").validate(), family_paths)
    ctx = RecordingContext(family_paths)
    with context_lengths(model.unet) as seen:
        textual_inversion.run(TextualInversionConfig(
            model=SDXL, embedding="zxqlong", data_root=str(long_captions), width=64, height=64,
            steps=2, save_every=0, preview_every=2, preview_steps=2, template="long.txt",
            max_token_length=150, learn_rate="0.05", preview_prompt=LONG + "red").validate(), ctx)
    assert seen[:2] == [154, 154] and [p.step for p in ctx.of(Preview)] == [2]
    create_hypernetwork(CreateHypernetworkConfig(name="hnlong", sizes=[80, 64], model=SDXL).validate(),
                        family_paths)
    with context_lengths(model.unet) as seen:
        hypernetwork.run(HypernetworkTrainingConfig(
            model=SDXL, hypernetwork="hnlong", data_root=str(long_captions), width=64, height=64,
            steps=1, save_every=0, preview_every=0, template="long.txt",
            max_token_length=225).validate(), RecordingContext(family_paths))
    assert seen == [154]  # A1111: the chunks this caption needs
    with context_lengths(model.unet) as seen:
        path = lora.run(LoraConfig(model=SDXL, output_name="xllong", train_data_dir=str(long_captions.parent),
                                   resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                                   bucket_reso_steps=16, network_dim=4, max_train_steps=1,
                                   save_every_n_epochs=0, sample_at_first=False, max_token_length=150,
                                   cache_text_encoder_outputs=True, network_train_unet_only=True,
                                   save_precision="fp32").validate(), RecordingContext(family_paths))
    assert seen == [152]  # kohya: BOS + 2 x 75 + EOS
    assert read_lora_metadata(path)["ss_max_token_length"] == "150"
