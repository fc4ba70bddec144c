"""Textual inversion end to end on the tiny model: learning, isolation, files, resume."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.events import Finished, Preview, Saved, Status
from tests.conftest import RecordingContext, repeat_with_interruption
from trainers.configs import CreateEmbeddingConfig, TextualInversionConfig
from trainers.embeddings import create_embedding
from trainers.formats.embedding import load_embedding
from trainers.methods.textual_inversion import run
from trainers.models import load_model


def make_embedding(paths, name="zxqtok", vectors=2, fmt="pt", init="cat"):
    cfg = CreateEmbeddingConfig(name=name, init_text=init, vectors_per_token=vectors,
                                model="tiny-demo", file_format=fmt).validate()
    return create_embedding(cfg, paths)


def ti_config(dataset, **changes):
    base = dict(model="tiny-demo", embedding="zxqtok", data_root=str(dataset), width=64, height=64,
                steps=8, save_every=0, preview_every=0, template="subject_filewords.txt",
                learn_rate="0.005", seed=3)
    base.update(changes)
    return TextualInversionConfig(**base).validate()


def module_digest(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def eval_loss(paths, dataset_dir, vectors) -> float:
    """Mean loss on fixed noise and timesteps: a yardstick independent of training randomness."""
    from trainers.data import load_dataset
    from trainers.prompts import PromptEncoder
    from trainers.step import diffusion_loss
    model = load_model(paths, "tiny-demo")
    data = load_dataset(dataset_dir, model.vae, 64, 64, varsize=False, batch_size=1, seed=0,
                        latent_sampling="deterministic", use_weight=False)
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, {"zxqtok": vectors})
    total = 0.0
    with torch.no_grad():
        for i, example in enumerate(data.examples):
            context = encoder.encode(["a photo of zxqtok"])
            for k in range(6):
                total += diffusion_loss(model.unet, model.objective(), example.latent[None],
                                        context, torch.Generator().manual_seed(100 * i + k)).item()
    return total / (len(data.examples) * 6)


def test_training_lowers_loss_and_changes_only_the_embedding(data_paths, photo_dataset):
    path = make_embedding(data_paths)
    (data_paths.data_dir / "textual_inversion_templates").mkdir()
    (data_paths.data_dir / "textual_inversion_templates" / "name.txt").write_text("a photo of [name]\n")
    before = load_embedding(path).vectors.clone()
    model = load_model(data_paths, "tiny-demo")
    digests = {n: module_digest(getattr(model, n)) for n in ("unet", "vae", "text_encoder")}
    start_loss = eval_loss(data_paths, photo_dataset, before)

    ctx = RecordingContext(data_paths)
    run(ti_config(photo_dataset, steps=60, learn_rate="0.1", latent_sampling="deterministic",
                  template="name.txt", batch_size=4), ctx)

    after = load_embedding(path)
    assert after.step == 60
    assert after.vectors.shape == before.shape
    assert not torch.equal(after.vectors, before)
    assert {n: module_digest(getattr(model, n)) for n in digests} == digests
    assert eval_loss(data_paths, photo_dataset, after.vectors) < start_loss
    assert isinstance(ctx.events[-1], Finished)


def test_output_files_logs_previews_and_png_embedding(data_paths, photo_dataset):
    path = make_embedding(data_paths)
    ctx = RecordingContext(data_paths)
    run(ti_config(photo_dataset, steps=4, save_every=2, preview_every=2, preview_steps=2), ctx)
    run_dirs = list((data_paths.outputs / "textual_inversion").glob("*/zxqtok"))
    assert len(run_dirs) == 1
    folder = run_dirs[0]
    assert sorted(p.name for p in (folder / "embeddings").iterdir()) == ["zxqtok-2.pt"]
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["zxqtok-2.png", "zxqtok-4.png"]
    lines = (folder / "textual_inversion_loss.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,epoch_step,loss,learn_rate"
    assert [int(line.split(",")[0]) for line in lines[1:]] == [1, 2, 3, 4]
    assert (folder / "settings-0.json").exists()
    previews = ctx.of(Preview)
    assert [p.step for p in previews] == [2, 4]
    from trainers.formats.png_embedding import read_png_embedding
    carried = read_png_embedding(folder / "image_embeddings" / "zxqtok-4.png")
    assert torch.equal(carried.vectors, load_embedding(path).vectors)
    assert load_embedding(folder / "embeddings" / "zxqtok-2.pt").step == 2
    assert path.with_name(path.name + ".optim").exists()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_trained_file_loads_in_diffusers_and_changes_output(data_paths, photo_dataset, fmt):
    from diffusers import StableDiffusionPipeline
    path = make_embedding(data_paths, fmt=fmt)
    run(ti_config(photo_dataset, steps=3), RecordingContext(data_paths))
    pipe = StableDiffusionPipeline.from_pretrained(data_paths.cache / "tiny-demo", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a photo of zxqtok", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    base = image()
    pipe.load_textual_inversion(str(path), token="zxqtok")
    assert not np.allclose(base, image())


def test_interrupted_then_resumed_run_repeats_the_uninterrupted_run(data_paths, photo_dataset, tmp_path):
    path = make_embedding(data_paths)
    pristine = tmp_path / "pristine.pt"
    shutil.copy(path, pristine)
    cfg = ti_config(photo_dataset, steps=8, batch_size=2, gradient_accumulation=2,
                    learn_rate="0.01:5, 0.003", latent_sampling="random", shuffle_tags=True)

    def reset():
        shutil.copy(pristine, path)
        path.with_name(path.name + ".optim").unlink()

    def after_first(path):
        assert load_embedding(path).step == 3
    _, _, second = repeat_with_interruption(
        run, cfg, data_paths, load=lambda p: [load_embedding(p).vectors.clone()], reset=reset,
        stop_after=3, after_first=after_first)
    assert any("saved optimizer state" in s.text for s in second.of(Status))


def test_schedule_end_stops_training(data_paths, photo_dataset):
    path = make_embedding(data_paths)
    run(ti_config(photo_dataset, steps=10, learn_rate="0.005:4"), RecordingContext(data_paths))
    assert load_embedding(path).step == 4


def test_corrupt_and_non_image_files_are_skipped_and_reported(data_paths, photo_dataset):
    make_embedding(data_paths)
    (photo_dataset / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (photo_dataset / "notes.pdf").write_bytes(b"%PDF-1.4")
    ctx = RecordingContext(data_paths)
    run(ti_config(photo_dataset, steps=1), ctx)
    report = [s.text for s in ctx.of(Status) if s.text.startswith("Skipped")]
    assert report and "broken.png" in report[0] and "notes.pdf" in report[0]


@pytest.mark.parametrize("setup, changes, expected", [
    ("missing", {}, "does not exist"),
    ("empty", {}, "contains no images"),
    (None, {"template": "nope.txt"}, "template"),
    (None, {"embedding": "unknown"}, "no embedding named"),
])
def test_bad_paths_are_refused_before_training(data_paths, photo_dataset, tmp_path, setup, changes, expected):
    make_embedding(data_paths)
    folder = photo_dataset
    if setup == "missing":
        folder = tmp_path / "missing"
    elif setup == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    cfg = ti_config(folder, **changes)
    with pytest.raises(ConfigError, match=expected):
        run(cfg, RecordingContext(data_paths))


@pytest.mark.parametrize("changes, field", [
    ({"learn_rate": "0.005:abc"}, "learn_rate"),
    ({"learn_rate": "0.1:100, 0.2:50"}, "learn_rate"),
    ({"width": 100}, "width"),
    ({"batch_size": 0}, "batch_size"),
    ({"embedding": "../escape"}, None),
])
def test_invalid_settings_name_the_field(photo_dataset, changes, field):
    base = dict(model="tiny-demo", embedding="zxqtok", data_root=str(photo_dataset))
    base.update(changes)
    cfg = TextualInversionConfig(**base)
    if field is None:  # a path-like embedding name is simply not found, never opened
        return
    with pytest.raises(ConfigError, match=field):
        cfg.validate()


def test_create_refuses_existing_name_and_path_characters(data_paths):
    path = make_embedding(data_paths)
    original = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        make_embedding(data_paths, vectors=4)
    assert path.read_bytes() == original
    with pytest.raises(ConfigError, match="name"):
        CreateEmbeddingConfig(name="../evil", model="tiny-demo").validate()
    overwritten = create_embedding(CreateEmbeddingConfig(name="zxqtok", vectors_per_token=4, model="tiny-demo",
                                                         overwrite=True).validate(), data_paths)
    assert load_embedding(overwritten).vectors.shape[0] == 4


def test_initial_vectors_follow_the_init_text(data_paths):
    model = load_model(data_paths, "tiny-demo")
    path = make_embedding(data_paths, vectors=3, init="cat dog")
    vectors = load_embedding(path).vectors
    table = model.text_encoder.get_input_embeddings().weight
    ids = model.tokenizer("cat dog", add_special_tokens=False).input_ids
    assert torch.equal(vectors[0], table[ids[0]])
    assert torch.equal(vectors[2], table[ids[1]])
    zeros = make_embedding(data_paths, name="blank", init="")
    assert not load_embedding(zeros).vectors.any()


def test_saved_events_name_the_final_file(data_paths, photo_dataset):
    path = make_embedding(data_paths)
    ctx = RecordingContext(data_paths, stop_after=2)
    run(ti_config(photo_dataset, steps=50), ctx)
    assert ctx.of(Saved)[-1].path == str(path)
    assert load_embedding(path).step == 2
    assert "interrupted" in ctx.events[-1].message
