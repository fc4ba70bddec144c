"""`python -m trainers create_embedding | create_hypernetwork | aesthetic_embedding`: the Create
tabs' configs and engine functions from the command line, on the tiny demo model (and a tiny
CLIP model built here): what they write, an existing name refused unless overwrite is set, bad
input named by its field."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest
import torch

from tests.conftest import ROOT, photo


def create(verb, paths, *settings, json_events=False):
    from trainers.__main__ import main
    args = [verb, "--data-dir", str(paths.data_dir)]
    for setting in settings:
        args += ["--set", setting]
    return main(args + (["--json-events"] if json_events else []))


def only_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("verb, key", [("create_embedding", "vectors_per_token"),
                                       ("create_hypernetwork", "layer_structure"),
                                       ("aesthetic_embedding", "batch_size")])
def test_print_config_of_each_verb_is_its_commented_config(verb, key):
    out = subprocess.run([sys.executable, "-m", "trainers", verb, "--print-config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from trainers.create_commands import CREATE_COMMANDS
    assert tomllib.loads(out.stdout)[key] == getattr(CREATE_COMMANDS[verb](), key)
    assert "# " in out.stdout and "overwrite = false" in out.stdout


# ---------------------------------------------------------------- create_embedding

def test_create_embedding_writes_the_init_texts_token_vectors(data_paths, capsys):
    from trainers.formats.embedding import load_embedding
    from trainers.models import load_model
    assert create("create_embedding", data_paths, "name=cat", "model=tiny-demo",
                  'init_text="a cat"', "vectors_per_token=3") == 0
    path = data_paths.embeddings / "cat.pt"
    assert f"Created embedding 'cat' (3 vectors from 'a cat', tiny-demo): {path}" \
        in capsys.readouterr().err
    model = load_model(data_paths, "tiny-demo")
    ids = model.tokenizer("a cat", add_special_tokens=False).input_ids
    table = model.text_encoder.get_input_embeddings().weight.detach()
    saved = load_embedding(path)
    assert saved.name == "cat" and saved.step == 0
    # A1111's spread of 2 tokens over 3 vectors: a, a, cat
    assert torch.equal(saved.vectors, table[[ids[0], ids[0], ids[1]]])


def test_create_embedding_refuses_an_existing_name_unless_overwrite(data_paths, capsys):
    from trainers.formats.embedding import load_embedding
    assert create("create_embedding", data_paths, "name=cat", "model=tiny-demo") == 0
    path = data_paths.embeddings / "cat.pt"
    before = path.read_bytes()
    capsys.readouterr()
    assert create("create_embedding", data_paths, "name=cat", "model=tiny-demo",
                  "vectors_per_token=2", json_events=True) == 1
    out, err = capsys.readouterr()
    line = only_error(err)
    assert "name: an embedding named 'cat' already exists (cat.pt)" in line
    assert "overwrite = true" in line
    assert json.loads(out.splitlines()[-1]) == {"event": "Failed", "message": line, "details": ""}
    assert path.read_bytes() == before
    assert create("create_embedding", data_paths, "name=cat", "model=tiny-demo",
                  "vectors_per_token=2", "overwrite=true", json_events=True) == 0
    finished = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert finished["event"] == "Finished" and finished["path"] == str(path)
    assert load_embedding(path).num_vectors == 2


@pytest.mark.parametrize("setting, named", [("vectors_per_token=0", "vectors_per_token"),
                                            ('name="../escape"', "name"),
                                            ('model="no-such-model"', "model"),
                                            ('file_format="ckpt"', "file_format")])
def test_create_embedding_names_the_bad_field(data_paths, capsys, setting, named):
    assert create("create_embedding", data_paths, "name=cat", "model=tiny-demo", setting) != 0
    assert f"{named}: " in only_error(capsys.readouterr().err)
    assert not list(data_paths.embeddings.iterdir())


# ---------------------------------------------------------------- create_hypernetwork

def test_create_hypernetwork_writes_the_asked_structure(data_paths, capsys):
    from trainers.formats.hypernetwork import load_hypernetwork
    assert create("create_hypernetwork", data_paths, "name=hn", "model=tiny-demo",
                  "sizes=[32, 64]", 'layer_structure="1, 1.5, 1"', 'activation_func="relu"') == 0
    path = data_paths.hypernetworks / "hn.pt"
    assert f"Created hypernetwork 'hn' (modules 32, 64, layers 1, 1.5, 1): {path}" \
        in capsys.readouterr().err
    net = load_hypernetwork(path)
    assert sorted(net.spec.sizes) == [32, 64]
    assert list(net.spec.layer_structure) == [1, 1.5, 1] and net.spec.activation_func == "relu"


def test_create_hypernetwork_refuses_an_existing_name_unless_overwrite(data_paths, capsys):
    assert create("create_hypernetwork", data_paths, "name=hn", "sizes=[32]") == 0
    path = data_paths.hypernetworks / "hn.pt"
    before = path.read_bytes()
    assert create("create_hypernetwork", data_paths, "name=hn", "sizes=[64]") == 1
    assert "name: a hypernetwork named 'hn' already exists" in only_error(capsys.readouterr().err)
    assert path.read_bytes() == before
    assert create("create_hypernetwork", data_paths, "name=hn", "sizes=[64]", "overwrite=true") == 0
    assert path.read_bytes() != before


@pytest.mark.parametrize("setting, named", [('layer_structure="1, x, 1"', "layer_structure"),
                                            ("sizes=[768]", "sizes"),
                                            ('activation_func="bogus"', "activation_func")])
def test_create_hypernetwork_names_the_bad_field(data_paths, capsys, setting, named):
    assert create("create_hypernetwork", data_paths, "name=hn", "model=tiny-demo", setting) != 0
    assert f"{named}: " in only_error(capsys.readouterr().err)
    assert not (data_paths.hypernetworks / "hn.pt").exists()


# ---------------------------------------------------------------- aesthetic_embedding

@pytest.fixture
def tiny_clip(data_paths):
    """A CLIPVisionModelWithProjection with random weights, in the data folder's models/CLIP."""
    from tests.test_aesthetic import save_processor, vision_config
    from transformers import CLIPVisionModelWithProjection
    torch.manual_seed(0)
    folder = data_paths.data_dir / "models" / "CLIP" / "tiny-clip"
    CLIPVisionModelWithProjection(vision_config()).save_pretrained(folder)
    save_processor(folder)
    return folder


@pytest.fixture
def look(data_paths):
    folder = data_paths.data_dir / "look"
    folder.mkdir()
    for i in range(3):
        photo(i, 40).save(folder / f"{i}.png")
    return folder


def test_aesthetic_embedding_writes_the_normalized_mean(data_paths, tiny_clip, look, capsys):
    from trainers.aesthetic import create_aesthetic_embedding
    from trainers.configs import AestheticEmbeddingConfig
    from trainers.formats.safe_load import safe_torch_load
    assert create("aesthetic_embedding", data_paths, "name=look", 'data_root="look"',
                  'clip_model="models/CLIP/tiny-clip"', "batch_size=2") == 0
    path = data_paths.aesthetic_embeddings / "look.pt"
    err = capsys.readouterr().err
    assert "Embedding images: 3/3" in err
    assert f"Created aesthetic embedding 'look' (from the images in look): {path}" in err
    saved = safe_torch_load(path)
    assert saved.shape == (1, 16) and torch.allclose(saved.norm(), torch.tensor(1.0))
    page = create_aesthetic_embedding(AestheticEmbeddingConfig(  # what the Aesthetic tab writes
        name="page", data_root=str(look), clip_model=str(tiny_clip)), data_paths)
    assert torch.allclose(saved, safe_torch_load(page), atol=1e-6)


def test_aesthetic_embedding_refuses_an_existing_name_unless_overwrite(data_paths, tiny_clip,
                                                                      look, capsys):
    settings = ("name=look", 'data_root="look"', 'clip_model="models/CLIP/tiny-clip"')
    assert create("aesthetic_embedding", data_paths, *settings) == 0
    path = data_paths.aesthetic_embeddings / "look.pt"
    path.write_bytes(b"kept")
    assert create("aesthetic_embedding", data_paths, *settings) == 1
    assert "name: look.pt already exists" in only_error(capsys.readouterr().err)
    assert path.read_bytes() == b"kept"
    assert create("aesthetic_embedding", data_paths, *settings, "overwrite=true") == 0
    assert path.read_bytes() != b"kept"


@pytest.mark.parametrize("setting, named", [('data_root="nowhere"', "data_root"),
                                            ('clip_model="models/CLIP/none"', "clip_model"),
                                            ("batch_size=0", "batch_size")])
def test_aesthetic_embedding_names_the_bad_field(data_paths, tiny_clip, look, capsys, setting,
                                                 named):
    assert create("aesthetic_embedding", data_paths, "name=look", 'data_root="look"',
                  'clip_model="models/CLIP/tiny-clip"', setting) != 0
    assert f"{named}: " in only_error(capsys.readouterr().err)
    assert not (data_paths.aesthetic_embeddings / "look.pt").exists()


# ---------------------------------------------------------------- textual_inversion create_missing

def train(method, paths, dataset, *settings):
    return create(method, paths, "model=tiny-demo", f'data_root="{dataset}"', "width=64",
                  "height=64", "steps=2", "preview_every=0", "save_every=0", *settings)


@pytest.mark.parametrize("method", ["textual_inversion", "apt"])
def test_training_creates_a_missing_embedding_when_asked_and_says_so(data_paths, photo_dataset,
                                                                     capsys, method):
    from trainers.formats.embedding import load_embedding
    assert train(method, data_paths, photo_dataset, "embedding=newtok", "create_missing=true",
                 'init_text="a cat"', "vectors_per_token=2") == 0
    path = data_paths.embeddings / "newtok.pt"
    err = capsys.readouterr().err
    assert f"Created the missing embedding 'newtok' from 'a cat' (2 vectors per token): {path}" \
        in err
    saved = load_embedding(path)
    assert saved.step == 2 and saved.num_vectors == 2
    # a second run finds it and trains it further, creating nothing
    assert train(method, data_paths, photo_dataset, "embedding=newtok", "create_missing=true",
                 "vectors_per_token=5", "steps=3") == 0
    assert "Created the missing embedding" not in capsys.readouterr().err
    assert load_embedding(path).step == 3 and load_embedding(path).num_vectors == 2


def test_training_a_missing_embedding_without_create_missing_names_the_option(data_paths,
                                                                              photo_dataset,
                                                                              capsys):
    assert train("textual_inversion", data_paths, photo_dataset, "embedding=newtok") == 2
    line = only_error(capsys.readouterr().err)
    assert "embedding: no embedding named 'newtok'" in line and "create_missing = true" in line
    assert not list(data_paths.embeddings.iterdir())


@pytest.mark.parametrize("setting, named", [('embedding="../newtok"', "embedding"),
                                            ("vectors_per_token=0", "vectors_per_token"),
                                            ('data_root="nowhere"', "data_root")])
def test_create_missing_checks_everything_before_creating(data_paths, photo_dataset, capsys,
                                                          setting, named):
    assert train("textual_inversion", data_paths, photo_dataset, "embedding=newtok",
                 "create_missing=true", setting) == 2
    assert f"{named}: " in only_error(capsys.readouterr().err)
    assert not list(data_paths.embeddings.iterdir())
