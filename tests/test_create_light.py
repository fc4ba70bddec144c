"""Create embedding / hypernetwork read only what they need of the base model (tokenizers and
token-embedding tables; the attention widths from configs or file headers) instead of loading
its pipeline into the app process, and give the same files as the loaded model does."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.test_models import single_file  # noqa: F401  (fixture)
from trainers import models, text_tables
from trainers.configs import CreateEmbeddingConfig, CreateHypernetworkConfig
from trainers.embeddings import create_embedding, initial_vectors
from trainers.formats.embedding import load_embedding
from trainers.formats.hypernetwork import load_hypernetwork
from trainers.formats.sd_checkpoint import save_single_file
from trainers.hypernetworks import create_hypernetwork

DEMOS = ["tiny-demo", "tiny-demo-sd2", "tiny-demo-sdxl"]
INIT = "a photo of a tabby cat"


@pytest.fixture
def no_loading(monkeypatch):
    """An empty model cache, and load_model refusing: the light path must not need it."""
    monkeypatch.setattr(models, "_cache", {})

    def refuse(*args, **kwargs):
        raise AssertionError("load_model was called")
    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture
def spy_loads(monkeypatch):
    """An empty model cache and the names load_model was called with (it still loads)."""
    monkeypatch.setattr(models, "_cache", {})
    calls, real = [], models.load_model
    monkeypatch.setattr(models, "load_model",
                        lambda paths, name, **kw: calls.append(name) or real(paths, name, **kw))
    return calls


def embed(paths, name, model, fmt="safetensors", count=3, init=INIT):
    return create_embedding(CreateEmbeddingConfig(
        name=name, init_text=init, vectors_per_token=count, model=model, file_format=fmt,
        overwrite=True).validate(), paths)


def expected_vectors(model, count=3, init=INIT):
    """What the loaded model gives (the path Create used before)."""
    halves = [initial_vectors(tok, enc, init, count)
              for tok, enc in zip(model.tokenizers, model.text_encoders)]
    sdxl = model.family == "sdxl"
    return dict(zip(("clip_l", "clip_g"), halves)) if sdxl else halves[0]


def assert_same_vectors(got, want):
    """The same tensors to the byte (dtype, shape, every bit)."""
    if isinstance(want, dict):
        assert set(got) == set(want)
        for key in want:
            assert_same_vectors(got[key], want[key])
        return
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.numpy().tobytes() == want.numpy().tobytes()
    assert got.abs().sum() > 0  # the init text's real rows, not zeros


def light_then_loaded(paths, model_name, monkeypatch):
    """The embedding the light path writes, and the one written again from the loaded model
    (through the cache, not the light reader): the same vectors and metadata."""
    monkeypatch.setattr(models, "_cache", {})
    light = load_embedding(embed(paths, "zxq", model_name))
    assert models._cache == {}  # no pipeline was built in this process
    loaded = models.load_model(paths, model_name)

    def refuse(*args):
        raise AssertionError("the light reader ran although the model is loaded")
    monkeypatch.setattr(text_tables, "_read", refuse)
    again = load_embedding(embed(paths, "zxq", model_name))
    assert_same_vectors(light.vectors, again.vectors)
    assert_same_vectors(light.vectors, expected_vectors(loaded))
    assert (light.name, light.step, light.sd_checkpoint, light.sd_checkpoint_name) == \
        (again.name, again.step, again.sd_checkpoint, again.sd_checkpoint_name)
    return light


@pytest.mark.parametrize("demo", DEMOS)
def test_demo_models_give_the_loaded_models_vectors_without_loading(family_paths, demo,
                                                                     monkeypatch):
    emb = light_then_loaded(family_paths, demo, monkeypatch)
    assert emb.sd_checkpoint is None and emb.sd_checkpoint_name == demo
    widths = {"tiny-demo": 32, "tiny-demo-sd2": 48}
    if demo in widths:
        assert tuple(emb.vectors.shape) == (3, widths[demo])
    else:
        assert {k: tuple(v.shape) for k, v in emb.vectors.items()} == {"clip_l": (3, 32),
                                                                       "clip_g": (3, 48)}


def test_the_light_path_builds_no_pipeline(family_paths, no_loading):
    for demo in DEMOS:
        for fmt in ("pt", "safetensors"):
            path = embed(family_paths, f"e-{demo}-{fmt}", demo, fmt=fmt)
            vectors = load_embedding(path).vectors
            halves = vectors.values() if isinstance(vectors, dict) else [vectors]
            assert all(v.shape[0] == 3 and v.abs().sum() > 0 for v in halves)
    assert models._cache == {}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_files_give_the_loaded_models_vectors(family_paths, family, monkeypatch):
    """Original-layout .safetensors (fp16, as shared) of each family, read by key."""
    demo = {"sd1": "tiny-demo", "sd2": "tiny-demo-sd2", "sdxl": "tiny-demo-sdxl"}[family]
    base = models.load_model(family_paths, demo)
    path = family_paths.stable_diffusion / f"tuned-{family}.safetensors"
    save_single_file(path, base.unet, base.vae, base.text_encoder, dtype=torch.float16,
                     family=family, text_encoder_2=base.text_encoder_2,
                     metadata={"danlu.base_config": demo})
    emb = light_then_loaded(family_paths, path.name, monkeypatch)
    assert emb.sd_checkpoint == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert emb.sd_checkpoint_name == f"tuned-{family}"


def test_a_single_file_with_the_shipped_skeleton(single_file, monkeypatch):  # noqa: F811
    paths, path, _ = single_file
    emb = light_then_loaded(paths, path.name, monkeypatch)
    assert emb.sd_checkpoint == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_a_ckpt_falls_back_to_loading_the_model(single_file, spy_loads):  # noqa: F811
    paths, path, _ = single_file
    light = load_embedding(embed(paths, "fromfile", path.name)).vectors
    assert spy_loads == []
    ckpt = path.with_suffix(".ckpt")
    torch.save({"state_dict": safetensors.torch.load_file(str(path))}, ckpt)
    emb = load_embedding(embed(paths, "fromckpt", ckpt.name))
    assert spy_loads == [ckpt.name]
    assert_same_vectors(emb.vectors, light)
    assert emb.sd_checkpoint == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]


def test_a_folder_with_bin_weights_falls_back(family_paths, spy_loads):
    folder = family_paths.stable_diffusion / "bin-only"
    shutil.copytree(family_paths.cache / "tiny-demo", folder)
    weights = folder / "text_encoder" / "model.safetensors"
    torch.save(safetensors.torch.load_file(str(weights)), folder / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    got = load_embedding(embed(family_paths, "frombin", "bin-only")).vectors
    assert spy_loads == ["bin-only"]
    want = load_embedding(embed(family_paths, "fromdemo", "tiny-demo")).vectors
    assert spy_loads == ["bin-only"]  # the demo itself read light
    assert_same_vectors(got, want)


def test_unknown_models_are_refused_by_field(family_paths, no_loading):
    for name, words in [("missing.safetensors", "model: .*was not found"),
                        ("../outside", "model: .*was not found")]:
        with pytest.raises(models.ModelError, match=words):
            embed(family_paths, "nope", name)
    odd = family_paths.stable_diffusion / "odd.safetensors"
    safetensors.torch.save_file({"something.else": torch.zeros(2)}, str(odd))
    with pytest.raises(models.ModelError, match="model: odd.safetensors is not a checkpoint of SD 1.x, SD 2.x, SDXL, .* in the original layout"):
        embed(family_paths, "nope", odd.name)
    assert not list(family_paths.embeddings.glob("nope*")) and models._cache == {}


def test_a_file_missing_the_table_falls_back_and_says_what_is_wrong(single_file, spy_loads):  # noqa: F811
    paths, path, _ = single_file
    state = safetensors.torch.load_file(str(path))
    del state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    broken = paths.stable_diffusion / "no-table.safetensors"
    safetensors.torch.save_file(state, str(broken))
    with pytest.raises(models.ModelError, match="model: could not load 'no-table.safetensors' "
                       r"\(no-table.safetensors has no cond_stage_model\.transformer\.text_model"
                       r"\.embeddings\.token_embedding\.weight\)"):
        embed(paths, "nope", broken.name)
    assert spy_loads == [broken.name]


def test_creating_an_embedding_imports_no_diffusers(family_paths):
    """The app process stays free of diffusers (and of a pipeline) for Create embedding."""
    root = Path(__file__).resolve().parent.parent
    script = ("import sys\n"
              "from pathlib import Path\nfrom core.paths import Paths\n"
              "from trainers.configs import CreateEmbeddingConfig\n"
              "from trainers.embeddings import create_embedding\n"
              f"paths = Paths(Path({str(family_paths.data_dir)!r}))\n"
              "for model in ('tiny-demo', 'tiny-demo-sdxl'):\n"
              "    create_embedding(CreateEmbeddingConfig(name='sub-' + model, init_text='cat',\n"
              "                                           model=model).validate(), paths)\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (family_paths.embeddings / "sub-tiny-demo-sdxl.pt").is_file()


# ---------------------------------------------------------------------------------------------
# Create hypernetwork


def hypernetwork(paths, name, sizes, model):
    return create_hypernetwork(CreateHypernetworkConfig(
        name=name, sizes=sizes, model=model, layer_structure="1, 2, 1").validate(), paths)


def test_hypernetwork_sizes_are_checked_without_loading(family_paths, no_loading):
    with pytest.raises(Exception, match=r"sizes: none of 768, 320 .*tiny-demo \(32, 64\)"):
        hypernetwork(family_paths, "hn-bad", [768, 320], "tiny-demo")
    with pytest.raises(Exception, match=r"sizes: none of 768 .*\(32, 48, 64\)"):
        hypernetwork(family_paths, "hn-bad", [768], "tiny-demo-sd2")
    assert not (family_paths.hypernetworks / "hn-bad.pt").exists()
    net = load_hypernetwork(hypernetwork(family_paths, "hn-xl", [80, 64], "tiny-demo-sdxl"))
    assert sorted(net.layers) == [64, 80]
    with pytest.raises(models.ModelError, match="model: .*was not found"):
        hypernetwork(family_paths, "hn-none", [32], "missing.safetensors")
    assert models._cache == {}


def test_hypernetwork_on_a_single_file_reads_widths_and_hash_from_the_file(family_paths,
                                                                          monkeypatch):
    from trainers.hypernetwork_attention import attention_widths
    from trainers.hypernetwork_sizes import model_sizes
    base = models.load_model(family_paths, "tiny-demo-sdxl")
    path = family_paths.stable_diffusion / "xl.safetensors"
    save_single_file(path, base.unet, base.vae, base.text_encoder, family="sdxl",
                     text_encoder_2=base.text_encoder_2,
                     metadata={"danlu.base_config": "tiny-demo-sdxl"})
    # the file's own widths (a demo fine-tune), not SDXL's 2048/640/1280
    assert model_sizes(family_paths, path.name) == [80, 64]
    assert set(model_sizes(family_paths, path.name)) == attention_widths(base.unet)
    monkeypatch.setattr(models, "_cache", {})
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(Exception, match=r"sizes: .*\(64, 80\)"):
        hypernetwork(family_paths, "hn-file", [2048, 640, 1280], path.name)
    net = load_hypernetwork(hypernetwork(family_paths, "hn-file", [80], path.name))
    assert net.spec.sd_checkpoint == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert net.spec.sd_checkpoint_name == "xl"


def test_hypernetwork_on_a_ckpt_loads_the_model(single_file, spy_loads):  # noqa: F811
    paths, path, unet = single_file
    ckpt = path.with_suffix(".ckpt")
    torch.save({"state_dict": safetensors.torch.load_file(str(path))}, ckpt)
    with pytest.raises(Exception, match=r"sizes: .*\(32, 64\)"):
        hypernetwork(paths, "hn-ckpt", [768], ckpt.name)
    assert spy_loads == [ckpt.name]
    net = load_hypernetwork(hypernetwork(paths, "hn-ckpt", [32], ckpt.name))
    assert net.spec.sd_checkpoint == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
