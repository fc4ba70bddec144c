"""APT / DreamArtist: a positive and a '-neg' embedding trained together with guidance in the
loss; both files are ordinary embeddings that diffusers loads."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, photo
from tests.test_cli_and_app import run as cli
from tests.test_textual_inversion import make_embedding
from trainers.configs import AptConfig
from trainers.formats.embedding import EmbeddingFile, load_embedding, save_embedding
from trainers.formats.optim_sidecar import load_optim
from trainers.loop import TrainingError
from trainers.methods.apt import negative_prompt, run
from trainers.models import load_model
from trainers.step import Guided, diffusion_loss


@pytest.fixture
def one_image(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    photo(2).save(folder / "cat.png")
    (folder / "cat.txt").write_text("a cat")
    return folder


def apt_config(folder, **changes):
    base = dict(model="tiny-demo", embedding="zxq", data_root=str(folder), width=32, height=32,
                steps=2, save_every=0, preview_every=0, learn_rate="0.05", seed=1,
                template="subject_filewords.txt", latent_sampling="deterministic")
    base.update(changes)
    return AptConfig(**base).validate()


def test_guided_loss_is_plain_when_the_pair_agrees_and_trains_the_negative(data_paths):
    model = load_model(data_paths, "tiny-demo")
    latents = torch.randn(1, 4, 4, 4)
    context = torch.randn(1, 77, 32)
    plain = diffusion_loss(model.unet, model.objective(), latents, context,
                           torch.Generator().manual_seed(0))
    same = diffusion_loss(model.unet, model.objective(), latents,
                          Guided(context, context.clone(), 5.0), torch.Generator().manual_seed(0))
    assert torch.allclose(plain, same, atol=1e-5)
    negative = torch.nn.Parameter(torch.randn(1, 77, 32))
    for scale, moves in ((5.0, True), (1.0, False)):
        negative.grad = None
        diffusion_loss(model.unet, model.objective(), latents, Guided(context, negative, scale),
                       torch.Generator().manual_seed(0)).backward()
        assert (negative.grad.abs().sum() > 0) == moves


def test_negative_prompt_swaps_only_the_whole_name():
    assert negative_prompt("a zxq cat, zxq", "zxq") == "a zxq-neg cat, zxq-neg"
    assert negative_prompt("zxqa zxq-neg", "zxq") == "zxqa zxq-neg"


def test_cli_trains_the_pair_and_diffusers_loads_both(tmp_path, tiny_model_dir, one_image):
    from diffusers import StableDiffusionPipeline
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / ".cache" / "tiny-demo")
    (data / "embeddings").mkdir(parents=True)
    start = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 0.02
    save_embedding(data / "embeddings" / "zxq.pt", EmbeddingFile(name="zxq", vectors=start, step=0))
    config = tmp_path / "apt.toml"
    config.write_text(f'model = "tiny-demo"\nembedding = "zxq"\ndata_root = "{one_image}"\n'
                      'width = 32\nheight = 32\nsteps = 3\npreview_every = 0\nsave_every = 0\n'
                      'learn_rate = "0.05"\ncfg_scale = 3.0\n')
    out = cli(["-m", "trainers", "apt", "--config", str(config), "--data-dir", str(data)])
    assert out.returncode == 0, out.stderr
    positive = load_embedding(data / "embeddings" / "zxq.pt")
    negative = load_embedding(data / "embeddings" / "zxq-neg.pt")
    assert positive.step == negative.step == 3
    assert positive.name == "zxq" and negative.name == "zxq-neg"
    assert not torch.allclose(positive.vectors, start)
    assert not torch.allclose(negative.vectors, positive.vectors)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image(prompt, negative_prompt=""):
        return pipe(prompt, negative_prompt=negative_prompt, height=64, width=64,
                    num_inference_steps=2, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]
    pipe.load_textual_inversion(str(data / "embeddings" / "zxq.pt"), token="zxq")
    pipe.load_textual_inversion(str(data / "embeddings" / "zxq-neg.pt"), token="zxq-neg")
    rows = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids(["zxq", "zxq_1"])], positive.vectors)
    assert torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids(["zxq-neg", "zxq-neg_1"])],
                       negative.vectors)
    base = image("a photo of a cat")
    assert np.abs(image("a photo of zxq cat") - base).max() > 1e-4  # positive prompt
    assert np.abs(image("a photo of a cat", "zxq-neg") - image("a photo of a cat", "a")).max() > 1e-4


def test_reconstruction_loss_adds_to_the_loss_and_ema_is_what_is_saved(data_paths, one_image):
    make_embedding(data_paths, name="zxq")
    start = load_embedding(data_paths.embeddings / "zxq.pt").vectors
    plain, recon = RecordingContext(data_paths), RecordingContext(data_paths)
    run(apt_config(one_image, steps=1), plain)
    for name in ("zxq.pt", "zxq.pt.optim", "zxq-neg.pt"):
        (data_paths.embeddings / name).unlink()
    make_embedding(data_paths, name="zxq")
    run(apt_config(one_image, steps=1, reconstruction_weight=1.0, ema_decay=0.9), recon)
    assert recon.losses[0] > plain.losses[0]  # same noise, plus the L1 term

    saved = load_embedding(data_paths.embeddings / "zxq.pt").vectors
    payload, _ = load_optim(data_paths.embeddings / "zxq.pt", "")
    raw = torch.load(str(data_paths.embeddings / "zxq.pt.optim"), weights_only=False)["danlu"]["apt_raw"]
    assert payload is None  # the sidecar pairs only with the files' own checksum
    assert torch.allclose(saved, 0.9 * start + 0.1 * raw["zxq"], atol=1e-6)


def test_bad_settings_are_named(data_paths, one_image):
    with pytest.raises(ConfigError, match="cfg_scale: must be above 1"):
        apt_config(one_image, cfg_scale=1.0)
    with pytest.raises(ConfigError, match="choose the positive embedding"):
        apt_config(one_image, embedding="zxq-neg")
    with pytest.raises(ConfigError, match="ema_decay: must be at most"):
        apt_config(one_image, ema_decay=1.0)
    make_embedding(data_paths, name="zxq")
    save_embedding(data_paths.embeddings / "zxq-neg.pt",
                   EmbeddingFile(name="zxq-neg", vectors=torch.zeros(2, 48), step=0))
    with pytest.raises(TrainingError, match="zxq-neg.pt has vectors of width 48"):
        run(apt_config(one_image), RecordingContext(data_paths))
