"""Validation loss (kohya's validation_split / validate_every_n_steps): held-out images never
train, the loss is a function of the weights alone (fixed timesteps and noise), it is logged
beside the training loss and plotted, resume stays exact, bad settings are named."""
from __future__ import annotations

import csv

import pytest
import torch

from core.config import ConfigError
from core.events import Progress, Status
from tests.conftest import RecordingContext, kohya_photos, photo, repeat_with_interruption
from trainers.configs import LoraConfig, TextualInversionConfig
from trainers.formats.lora import load_lora
from trainers.kohya_data import folder_dataset, prepare_datasets
from trainers.loop import Batch
from trainers.methods.lora import run
from trainers.validation import Validation, fixed_times, split_indices, validation_loss


@pytest.fixture
def kohya_folder(tmp_path):
    return kohya_photos(tmp_path / "train")


def lora_config(folder, **changes):
    base = dict(model="tiny-demo", output_name="vallora", train_data_dir=str(folder),
                resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                network_dim=4, network_alpha=2.0, max_train_steps=6, save_every_n_epochs=0,
                sample_at_first=False, learning_rate=1e-3, seed=7, save_precision="fp32",
                validation_split=0.34, validate_every_n_steps=2)
    base.update(changes)
    return LoraConfig(**base).validate()


def test_split_is_seeded_disjoint_and_refuses_holding_out_everything():
    names = [f"img{i}.png" for i in range(10)]
    keep, held = split_indices(names, 0.3, seed=1)
    assert len(held) == 3 and not set(keep) & set(held) and len(keep) + len(held) == 10
    flipped = list(reversed(names))  # the same files listed in another order
    assert sorted(flipped[i] for i in split_indices(flipped, 0.3, seed=1)[1]) == \
        sorted(names[i] for i in held)
    with pytest.raises(ValueError, match="validation_split: holding out 0.9 of 1 image"):
        split_indices(["a.png"], 0.9, seed=0)


def test_held_out_images_never_train_and_are_cached(tmp_path):
    from trainers.tiny_model import build_components
    _, vae, _ = build_components(0)
    root = kohya_photos(tmp_path / "train")
    config = folder_dataset(root, resolution=64, validation_split=0.34, enable_bucket=True,
                            min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    batches = prepare_datasets(config, vae.eval(), seed=7)
    (dataset,) = batches.datasets
    held = {e.path.name for e in dataset.validation_images}
    trained = {e.path.name for e in dataset.train_images}
    assert len(held) == 1 and len(trained) == 2 and not held & trained
    seen = set()
    for micro in range(batches.batches_per_epoch * 3):
        _, _, number, keys = batches.plan(micro)
        seen |= {dataset.entries[k].path.name for k in keys}
    assert seen == trained
    (batch,) = batches.validation_batches()
    assert batch.texts == [next(e.caption for e in dataset.validation_images)]
    assert batch.latents.shape[0] == 1


class TinyUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.dropout = torch.nn.Dropout(0.5)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def forward(self, x, t, context, **kwargs):
        return type("Out", (), {"sample": self.dropout(self.conv(x))})()


def test_same_weights_same_validation_loss_whatever_the_training_rng():
    from trainers.objectives import NoisePrediction
    objective = NoisePrediction({"num_train_timesteps": 1000, "prediction_type": "epsilon"})
    assert fixed_times(objective) == [200, 400, 600, 800]
    unet = TinyUNet().train()
    batches = [Batch(latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)),
                     texts=["x"]) for i in range(2)]
    validation = Validation(batches=batches, every=1, seed=3)
    encode = lambda texts: torch.zeros(len(texts), 2, 8)  # noqa: E731
    torch.manual_seed(0)
    first = validation_loss(None, unet, objective, validation, encode)
    after_first = torch.rand(3)
    torch.manual_seed(12345)
    torch.rand(100)
    second = validation_loss(None, unet, objective, validation, encode)
    assert first == second  # eval mode (no dropout), fixed times and noise
    torch.manual_seed(0)
    validation_loss(None, unet, objective, validation, encode)
    assert torch.equal(torch.rand(3), after_first)  # the global stream is left as it was
    assert unet.training


def test_lora_run_logs_validation_loss_and_resumes_exactly(data_paths, kohya_folder):
    ctx = RecordingContext(data_paths)
    run(lora_config(kohya_folder), ctx)
    points = [(p.step, p.validation_loss) for p in ctx.of(Progress) if p.validation_loss is not None]
    assert [step for step, _ in points] == [2, 4, 6]
    run_dir = next((data_paths.outputs / "lora").glob("*/vallora"))
    with open(run_dir / "validation.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "loss"] and [int(r[0]) for r in rows[1:]] == [2, 4, 6]
    assert [float(r[1]) for r in rows[1:]] == pytest.approx([v for _, v in points], rel=1e-6)
    # the Checkpoints tab's run history reads it, and both plots draw it as its own series
    from trainers import runs
    from webui import live
    (found,) = [r for r in runs.scan_runs(data_paths) if r.name == "vallora"]
    assert [step for step, *_ in found.validation] == [2, 4, 6]
    frame = live.with_validation(live.loss_frame(found.losses), found.validation)
    assert sorted(set(frame["series"])) == ["loss", "smoothed", "validation"]

    def reset():
        for leftover in data_paths.lora.iterdir():
            leftover.unlink()
    reset()
    repeat_with_interruption(run, lora_config(kohya_folder), data_paths,
                             load=lambda path: load_lora(path)[0], reset=reset)


def test_bad_validation_settings_are_named(tmp_path, data_paths, kohya_folder):
    with pytest.raises(ConfigError, match="validation_split: the held-out share must be"):
        lora_config(kohya_folder, validation_split=1.0)
    with pytest.raises(ConfigError, match="validate_every_n_steps: set how often"):
        lora_config(kohya_folder, validate_every_n_steps=0)
    with pytest.raises(ConfigError, match="validation_data_dir: validation images come from"):
        lora_config(kohya_folder, validation_data_dir="x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="validation_data_dir: .*no usable images"):
        run(lora_config(kohya_folder, validation_split=0.0, validation_data_dir=str(empty)),
            RecordingContext(data_paths))
    with pytest.raises(ConfigError, match="validation_split"):
        TextualInversionConfig(model="tiny-demo", data_root="d", embedding="e",
                               validation_split=1.5, validate_every_n_steps=1).validate()


def test_validation_folder_for_lora(data_paths, kohya_folder, tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    photo(4, 64).save(folder / "v.png")
    (folder / "v.txt").write_text("zxq cat, held out")
    ctx = RecordingContext(data_paths)
    run(lora_config(kohya_folder, validation_split=0.0, validation_data_dir=str(folder),
                    max_train_steps=2), ctx)
    assert [p.validation_loss is not None for p in ctx.of(Progress)] == [False, True]


def test_textual_inversion_holds_out_and_validates(data_paths, photo_dataset):
    """The A1111-style methods (TI here; hypernetwork, APT, XTI share template_training)."""
    from tests.test_textual_inversion import make_embedding, ti_config
    from trainers.methods.textual_inversion import run as run_ti
    make_embedding(data_paths)
    ctx = RecordingContext(data_paths)
    run_ti(ti_config(photo_dataset, steps=4, validation_split=0.25, validate_every_n_steps=2,
                     latent_sampling="random"), ctx)
    points = [p.validation_loss for p in ctx.of(Progress)]
    assert [v is not None for v in points] == [False, True, False, True]
    assert any("Validation loss on 1 image(s)" in s.text for s in ctx.of(Status))
    run_dir = next((data_paths.outputs / "textual_inversion").glob("*/zxqtok"))
    assert (run_dir / "validation.csv").read_text().count("\n") == 3


def test_flow_families_validate_at_fixed_sigmas():
    from trainers.objectives import FlowMatching
    objective = FlowMatching()
    assert fixed_times(objective) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    unet = TinyUNet().train()
    batch = Batch(latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                  texts=["x"])
    validation = Validation(batches=[batch], every=1, seed=3)
    encode = lambda texts: torch.zeros(len(texts), 2, 8)  # noqa: E731
    first = validation_loss(None, unet, objective, validation, encode)
    assert first == validation_loss(None, unet, objective, validation, encode) and first > 0


def test_dreambooth_with_a_mask_folder_and_validation(data_paths, kohya_folder, tmp_path):
    """The full-model path: masks from a folder and a held-out share in one DreamBooth run."""
    from PIL import Image
    from tests.test_dreambooth import db_config
    from trainers.methods.dreambooth import run as run_db
    masks = tmp_path / "masks"
    masks.mkdir()
    for image in (kohya_folder / "2_zxq cat").glob("*.png"):
        with Image.open(image) as opened:
            Image.new("L", opened.size, 255).save(masks / image.name)
    ctx = RecordingContext(data_paths)
    run_db(db_config(kohya_folder, masked_loss=True, conditioning_data_dir=str(masks),
                     validation_split=0.34, validate_every_n_steps=3), ctx)
    assert [p.validation_loss is not None for p in ctx.of(Progress)] == [False, False, True]


def test_dataset_toml_split_validates_with_the_form_interval(data_paths, kohya_folder, tmp_path):
    toml = tmp_path / "data.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\nvalidation_split = 0.34\n'
                    f'[[datasets.subsets]]\nimage_dir = "{kohya_folder / "2_zxq cat"}"\n')
    ctx = RecordingContext(data_paths)
    run(lora_config(kohya_folder, train_data_dir="", dataset_config=str(toml),
                    validation_split=0.0, max_train_steps=2), ctx)
    assert [p.validation_loss is not None for p in ctx.of(Progress)] == [False, True]
    ctx = RecordingContext(data_paths)  # no split anywhere: the interval alone validates nothing
    run(lora_config(kohya_folder, validation_split=0.0, max_train_steps=2, overwrite=True), ctx)
    assert all(p.validation_loss is None for p in ctx.of(Progress))
