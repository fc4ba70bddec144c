"""XTI (P+): one embedding per U-Net cross-attention layer, kohya's file layout, training."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, photo
from tests.test_cli_and_app import run as cli
from trainers.configs import XtiConfig
from trainers.formats.xti import XtiFile, XtiFormatError, load_xti, save_xti
from trainers.loop import TrainingError
from trainers.models import load_model
from trainers.prompts import PromptEncoder
from trainers.xti_layers import XtiEncoder, layer_names, per_layer

KOHYA_SD1 = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05",
             "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]


def test_sd1_has_kohyas_16_layers_and_the_tiny_unet_its_own(data_paths):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from trainers.models import CONFIG_SKELETONS
    config = json.loads((CONFIG_SKELETONS / "sd1" / "unet" / "config.json").read_text())
    with init_empty_weights():
        sd1 = UNet2DConditionModel.from_config(config)
    assert layer_names(sd1) == KOHYA_SD1
    assert layer_names(load_model(data_paths, "tiny-demo").unet) == ["IN01", "MID", "OUT02", "OUT03"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_and_bad_files(tmp_path, suffix):
    layers = {name: torch.randn(2, 768) for name in KOHYA_SD1}
    path = tmp_path / f"x{suffix}"
    save_xti(path, XtiFile(name="x", layers=layers, step=7))
    back = load_xti(path)
    assert list(back.layers) == KOHYA_SD1
    assert all(torch.equal(back.layers[k], layers[k]) for k in KOHYA_SD1)
    if suffix == ".safetensors":  # kohya's loader reads a plain {layer: tensor} file
        from safetensors.torch import load_file
        assert set(load_file(str(path))) == set(KOHYA_SD1)
        assert back.step == 7 and back.name == "x"
    with pytest.raises(XtiFormatError, match="different shapes"):
        save_xti(path, XtiFile(name="x", layers={"IN01": torch.zeros(1, 8), "MID": torch.zeros(2, 8)}))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(XtiFormatError, match="junk.safetensors"):
        load_xti(tmp_path / "junk.safetensors")


def test_each_layer_gets_its_own_vectors(data_paths):
    model = load_model(data_paths, "tiny-demo")
    names = layer_names(model.unet)
    same = torch.randn(2, 32)
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])

    def predict(vectors):
        encoder = XtiEncoder(PromptEncoder(model.tokenizer, model.text_encoder), "zxq", vectors)
        with torch.no_grad(), per_layer(model.unet):
            return model.unet(latents, t, encoder.encode(["a photo of zxq"])).sample

    plain = PromptEncoder(model.tokenizer, model.text_encoder, {"zxq": same})
    with torch.no_grad():
        expected = model.unet(latents, t, plain.encode(["a photo of zxq"])).sample
    uniform = predict({n: same for n in names})
    assert torch.allclose(uniform, expected, atol=1e-5)  # equal layers = plain TI
    for changed in names:  # every layer's own vectors reach the output
        # (not a constant shift: CLIP's layer norms cancel those)
        vectors = {n: (torch.randn(2, 32) if n == changed else same) for n in names}
        assert not torch.allclose(predict(vectors), uniform, atol=1e-5), changed


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
    return folder


def test_cli_trains_one_entry_per_layer_with_previews(tmp_path, tiny_model_dir, images):
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / ".cache" / "tiny-demo")
    config = tmp_path / "xti.toml"
    config.write_text(f'model = "tiny-demo"\noutput_name = "xtok"\ndata_root = "{images}"\n'
                      'width = 32\nheight = 32\nsteps = 2\npreview_every = 2\npreview_steps = 2\n'
                      'save_every = 0\nlearn_rate = "0.05"\ninit_text = "cat"\n'
                      'num_vectors_per_token = 2\ntemplate = "subject_filewords.txt"\n')
    out = cli(["-m", "trainers", "xti", "--config", str(config), "--data-dir", str(data)])
    assert out.returncode == 0, out.stderr
    assert "Starting the new xtok.safetensors from 'cat' (2 vectors per token in each of 4 " \
        "layers)" in out.stderr
    saved = load_xti(data / "models" / "xti" / "xtok.safetensors")
    assert list(saved.layers) == ["IN01", "MID", "OUT02", "OUT03"] and saved.step == 2
    assert all(v.shape == (2, 32) for v in saved.layers.values())
    values = list(saved.layers.values())
    assert not torch.allclose(values[0], values[-1])  # each layer learned its own vectors
    assert list((data / "outputs" / "xti").rglob("images/xtok-2.png"))


def test_continues_from_its_file_and_refuses_a_mismatched_one(data_paths, images):
    base = dict(model="tiny-demo", output_name="xtok", data_root=str(images), width=32, height=32,
                save_every=0, preview_every=0, learn_rate="0.05", seed=2,
                template="subject_filewords.txt")
    from trainers.methods.xti import run
    path = run(XtiConfig(**base, steps=1).validate(), RecordingContext(data_paths))
    first = load_xti(path)
    ctx = RecordingContext(data_paths)
    run(XtiConfig(**base, steps=2).validate(), ctx)
    assert load_xti(path).step == 2
    assert any("Resuming at step 1" in getattr(e, "text", "") for e in ctx.events)

    save_xti(path, XtiFile(name="xtok", layers={"IN01": torch.zeros(1, 32)}))
    with pytest.raises(TrainingError, match="xtok.safetensors has layers IN01 .*Start over"):
        run(XtiConfig(**base, steps=3).validate(), RecordingContext(data_paths))
    run(XtiConfig(**base, steps=1, overwrite=True).validate(), RecordingContext(data_paths))
    assert list(load_xti(path).layers) == list(first.layers)
    with pytest.raises(ConfigError, match="output_name: 'a/b' may not contain path characters"):
        XtiConfig(**{**base, "output_name": "a/b"}).validate()
