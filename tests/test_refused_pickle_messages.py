"""Wherever a pickle is refused, the message says which file and what it wanted, and never
passes on torch's advice to load it again with `weights_only=False` (which would run it):
diffusers folders with .bin weights, .ckpt models, embeddings, hypernetworks, LoRA and XTI
files, optimizer sidecars, aesthetic embeddings, CLIP folders and the captioners' weights."""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from core.paths import Paths
from core.unpickle_errors import refusal_reason, refused_globals, without_unsafe_advice

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")
TORCH_ADVICE = ("weights_only", "Re-running", "trusted source", "safe_globals")


class RunsCommand:
    """Unpickling this calls os.system(command): proof that code from the file ran."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": RunsCommand(f"touch {marker}")}, "w": RunsCommand("true")},
               path)


def assert_plain_refusal(message: str, file: str):
    assert file in message, message
    assert "refused to load" in message and "posix.system" in message, message
    for words in TORCH_ADVICE:
        assert words not in message, (words, message)


@pytest.mark.parametrize("part, file", [
    ("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin"),
    ("text_encoder", "pytorch_model.bin")])
def test_a_diffusers_folder_with_a_refused_bin(tmp_path, tiny_model_dir, part, file):
    from trainers.models import ModelError, load_model
    marker = tmp_path / "PWNED"
    paths = Paths(tmp_path / "data").ensure()
    folder = paths.stable_diffusion / "planted"
    shutil.copytree(tiny_model_dir, folder)
    for weights in (folder / part).glob("*.safetensors"):
        weights.unlink()
    plant(folder / part / file, marker)
    with pytest.raises(ModelError) as caught:
        load_model(paths, "planted")
    message = str(caught.value)
    assert message.startswith("model: could not load 'planted': ")
    assert_plain_refusal(message, f"{part}/{file}")
    assert not marker.exists()


def test_a_ckpt_model(tmp_path):
    from trainers.models import ModelError, load_model
    marker = tmp_path / "PWNED"
    paths = Paths(tmp_path / "data").ensure()
    plant(paths.stable_diffusion / "planted.ckpt", marker)
    with pytest.raises(ModelError) as caught:
        load_model(paths, "planted.ckpt")
    assert_plain_refusal(str(caught.value), "planted.ckpt")
    assert not marker.exists()


def test_every_file_loader(tmp_path):
    from trainers.aesthetic import load_aesthetic_embedding
    from trainers.formats.embedding import load_embedding
    from trainers.formats.hypernetwork import load_hypernetwork
    from trainers.formats.lora import load_lora
    from trainers.formats.optim_sidecar import load_optim
    from trainers.formats.xti import load_xti
    marker = tmp_path / "PWNED"
    loaders = {"emb.pt": load_embedding, "emb.bin": load_embedding, "hn.pt": load_hypernetwork,
               "lora.pt": load_lora, "xti.pt": load_xti, "look.pt": load_aesthetic_embedding}
    for name, loader in loaders.items():
        plant(tmp_path / name, marker)
        with pytest.raises(ValueError) as caught:
            loader(tmp_path / name)
        assert_plain_refusal(str(caught.value), name)
    plant(tmp_path / "e.pt.optim", marker)
    payload, reason = load_optim(tmp_path / "e.pt", "anything")
    assert payload is None
    assert_plain_refusal(reason, "e.pt.optim")
    assert not marker.exists()


def test_a_clip_folder_with_a_refused_bin(tmp_path):
    import json
    from trainers.aesthetic import AestheticError, load_clip
    marker = tmp_path / "PWNED"
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    plant(folder / "pytorch_model.bin", marker)
    with pytest.raises(AestheticError) as caught:
        load_clip(folder)
    message = str(caught.value)
    assert message.startswith("clip_model: could not load"), message
    assert_plain_refusal(message, "pytorch_model.bin")
    assert not marker.exists()


def test_the_captioners_weights(tmp_path):
    import json
    from preprocess.captioners import CaptionerError
    from preprocess.captioners.blip import load_model as load_blip
    from preprocess.captioners.deepbooru import load_model as load_deepbooru
    marker = tmp_path / "PWNED"
    blip = tmp_path / "blip"
    blip.mkdir()
    (blip / "config.json").write_text(json.dumps({"model_type": "blip"}))
    plant(blip / "pytorch_model.bin", marker)
    with pytest.raises(CaptionerError) as caught:
        load_blip(blip)
    assert str(caught.value).startswith(f"blip_model: cannot load BLIP from {blip}: ")
    assert_plain_refusal(str(caught.value), "pytorch_model.bin")
    plant(tmp_path / "model-resnet_custom_v3.pt", marker)
    with pytest.raises(CaptionerError) as caught:
        load_deepbooru(tmp_path / "model-resnet_custom_v3.pt")
    message = str(caught.value)
    assert message.startswith("deepbooru_model: model-resnet_custom_v3.pt: refused to load")
    assert_plain_refusal(message, "model-resnet_custom_v3.pt")
    assert not marker.exists()


def test_a_refusal_that_names_no_global_gives_torchs_reason_alone(tmp_path):
    """A plain Python set is not code, but the restricted loader does not read it either."""
    from trainers.formats.safe_load import NotATorchFileError, safe_torch_load
    path = tmp_path / "set.pt"
    path.write_bytes(pickle.dumps({"a": {1, 2}}, protocol=4))
    with pytest.raises(NotATorchFileError) as caught:
        safe_torch_load(path)
    message = str(caught.value)
    assert message.startswith("set.pt: ") and "Unsupported operand" in message
    for words in TORCH_ADVICE:
        assert words not in message, (words, message)


def test_the_text_helpers_on_torchs_own_messages(tmp_path):
    marker = tmp_path / "PWNED"
    plant(tmp_path / "evil.pt", marker)
    with pytest.raises(pickle.UnpicklingError) as caught:
        torch.load(tmp_path / "evil.pt", weights_only=True)
    text = str(caught.value)
    assert "weights_only" in text  # what torch says, and what must not be shown
    assert refused_globals(text) == ["posix.system"]
    assert refusal_reason(text) == \
        "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
    assert without_unsafe_advice(text) == refusal_reason(text)
    assert without_unsafe_advice("disk full") == "disk full"
    allowlist = ("WeightsUnpickler error: Unsupported global: GLOBAL x.Y was not an allowed "
                 "global by default. Please use `torch.serialization.add_safe_globals([x.Y])` "
                 "or the `torch.serialization.safe_globals([x.Y])` context manager to allowlist "
                 "this global if you trust this global.")
    assert refused_globals(allowlist) == ["x.Y"]
    assert refusal_reason(allowlist) == \
        "Unsupported global: GLOBAL x.Y was not an allowed global by default."
    assert not marker.exists()
