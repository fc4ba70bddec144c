"""LoRA training end to end on the tiny model: kohya folders, buckets, files, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.events import Preview
from tests.conftest import RecordingContext, demo_images_with_lora, kohya_photos, repeat_with_interruption
from tests.test_textual_inversion import module_digest
from trainers.configs import LoraConfig
from trainers.formats.lora import load_lora
from trainers.loop import TrainingError
from trainers.methods.lora import run
from trainers.models import load_model


@pytest.fixture
def kohya_folder(tmp_path):
    return kohya_photos(tmp_path / "train")


def clear(folder):
    for leftover in folder.iterdir():
        leftover.unlink()


def lora_config(folder, **changes):
    base = dict(model="tiny-demo", output_name="mylora", train_data_dir=str(folder), resolution=64,
                min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, network_dim=4,
                network_alpha=2.0, max_train_steps=6, save_every_n_epochs=0, sample_at_first=False,
                learning_rate=1e-3, seed=7, save_precision="fp32")
    base.update(changes)
    return LoraConfig(**base).validate()


def test_lora_trains_saves_kohya_file_and_leaves_the_base_model_alone(data_paths, kohya_folder):
    model = load_model(data_paths, "tiny-demo")
    digests = {n: module_digest(getattr(model, n)) for n in ("unet", "text_encoder", "vae")}
    classes = {n: type(m).__name__ for n, m in model.unet.named_modules()}
    ctx = RecordingContext(data_paths)
    path = run(lora_config(kohya_folder, save_every_n_steps=3, sample_every_n_steps=3,
                           sample_prompts="zxq cat --w 64 --h 64 --s 2 --d 3"), ctx)
    assert path == data_paths.lora / "mylora.safetensors"
    state, meta = load_lora(path)
    assert meta["ss_steps"] == "6" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["ss_tag_frequency"])["2_zxq cat"]["zxq cat"] == 3
    assert json.loads(meta["ss_dataset_dirs"])["2_zxq cat"] == {"n_repeats": 2, "img_count": 3}
    assert any(k.startswith("lora_unet_") for k in state) and any(k.startswith("lora_te_") for k in state)
    assert {n: module_digest(getattr(model, n)) for n in digests} == digests
    assert {n: type(m).__name__ for n, m in model.unet.named_modules()} == classes
    previews = ctx.of(Preview)
    assert [p.step for p in previews] == [3, 6]
    run_dir = next((data_paths.outputs / "lora").glob("*/mylora"))
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["mylora-3.safetensors"]
    assert (run_dir / "loss.csv").read_text().count("\n") == 7


def test_lora_file_loads_in_diffusers_and_changes_output(data_paths, kohya_folder):
    path = run(lora_config(kohya_folder, max_train_steps=4, learning_rate=5e-3), RecordingContext(data_paths))
    base, with_lora = demo_images_with_lora(data_paths, path)
    assert not np.allclose(base, with_lora)


def test_interrupted_then_resumed_lora_repeats_the_uninterrupted_run(data_paths, kohya_folder):
    cfg = lora_config(kohya_folder, max_train_steps=6, lr_scheduler="cosine", lr_warmup_steps=2,
                      flip_aug=True, shuffle_caption=True, train_batch_size=2)
    def after_first(path):
        assert load_lora(path)[1]["ss_steps"] == "2"
    repeat_with_interruption(run, cfg, data_paths, load=lambda path: load_lora(path)[0],
                             reset=lambda: clear(data_paths.lora), after_first=after_first)


@pytest.mark.parametrize("optimizer", ["PagedAdamW8bit", "Adafactor"])
def test_optimizers_with_state_of_other_shapes_resume_exactly(data_paths, kohya_folder, optimizer):
    """State that is not shaped like its parameter — bitsandbytes' quantization maps and block
    maxima (rank 64 makes the 64x64 down-projections big enough for 8-bit state), Adafactor's
    factored rows and columns — is saved and restored exactly, not refused."""
    from trainers.optimizers import available_optimizers
    reason = available_optimizers()[optimizer]
    if reason is not None:
        pytest.skip(reason)
    cfg = lora_config(kohya_folder, max_train_steps=4, network_dim=64, network_alpha=32.0,
                      optimizer_type=optimizer, network_train_unet_only=True)
    def load(path):
        weights, metadata = load_lora(path)
        assert metadata["ss_optimizer"] == optimizer
        return weights
    repeat_with_interruption(run, cfg, data_paths, load=load, reset=lambda: clear(data_paths.lora))


def test_training_lowers_the_loss(data_paths, kohya_folder):
    from trainers.kohya_data import folder_dataset, prepare_datasets
    from trainers.lora_network import LoraNetwork, LoraSpec
    from trainers.prompts import PromptEncoder
    from trainers.step import diffusion_loss
    model = load_model(data_paths, "tiny-demo")
    batches = prepare_datasets(folder_dataset(kohya_folder, resolution=64, min_bucket_reso=32,
                                              max_bucket_reso=128, bucket_reso_steps=16), model.vae)
    encoder = PromptEncoder(model.tokenizer, model.text_encoder)

    def loss():
        total = 0.0
        with torch.no_grad():
            for m in range(batches.batches_per_epoch):
                batch = batches.batch(m)
                total += diffusion_loss(model.unet, model.objective(), batch.latents,
                                        encoder.encode(batch.texts), torch.Generator().manual_seed(m)).item()
        return total
    before = loss()
    path = run(lora_config(kohya_folder, max_train_steps=40, learning_rate=3e-3,
                           network_train_unet_only=True), RecordingContext(data_paths))
    with LoraNetwork(model.unet, None, LoraSpec(rank=4, alpha=2.0, train_text_encoder=False)) as net:
        net.load_kohya_state_dict(load_lora(path)[0])
        after = loss()
    assert after < before


def test_sample_at_first_and_keep_last_n(data_paths, kohya_folder):
    ctx = RecordingContext(data_paths)
    run(lora_config(kohya_folder, max_train_steps=6, save_every_n_steps=1, save_last_n=2,
                    sample_every_n_steps=6, sample_at_first=True,
                    sample_prompts="a --s 2\nb --s 2 --w 32 --h 32"), ctx)
    assert [p.step for p in ctx.of(Preview)] == [0, 0, 6, 6]
    run_dir = next((data_paths.outputs / "lora").glob("*/mylora"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["mylora-4.safetensors", "mylora-5.safetensors"]


def test_resume_with_another_network_config_is_refused(data_paths, kohya_folder):
    run(lora_config(kohya_folder, max_train_steps=2), RecordingContext(data_paths))
    original = (data_paths.lora / "mylora.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="cannot be continued"):
        run(lora_config(kohya_folder, max_train_steps=4, network_dim=8), RecordingContext(data_paths))
    assert (data_paths.lora / "mylora.safetensors").read_bytes() == original
    run(lora_config(kohya_folder, max_train_steps=2, network_dim=8, overwrite=True), RecordingContext(data_paths))
    assert load_lora(data_paths.lora / "mylora.safetensors")[1]["ss_network_dim"] == "8"


@pytest.mark.parametrize("changes, words", [
    ({"network_dim": 0}, "network_dim"),
    ({"network_alpha": -1.0}, "network_alpha"),
    ({"output_name": "../x"}, "output_name"),
    ({"resolution": 100}, "resolution"),
])
def test_bad_settings_are_named(kohya_folder, changes, words):
    with pytest.raises(ConfigError, match=words):
        lora_config(kohya_folder, **changes)


def test_missing_optimizer_and_empty_repeats_folder(data_paths, kohya_folder, tmp_path):
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="bitsandbytes"):
            run(lora_config(kohya_folder, optimizer_type="AdamW8bit"), RecordingContext(data_paths))
    empty = tmp_path / "empty"
    (empty / "5_nothing here").mkdir(parents=True)
    with pytest.raises(Exception, match="5_nothing here"):
        run(lora_config(empty), RecordingContext(data_paths))


def test_toml_dataset_config_with_unknown_key_names_it(data_paths, kohya_folder, tmp_path):
    toml = tmp_path / "data.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{kohya_folder / "2_zxq cat"}"\n'
                    'num_repeat = 3\n')
    with pytest.raises(ConfigError, match="num_repeat"):
        run(lora_config(kohya_folder, dataset_config=str(toml)), RecordingContext(data_paths))


def test_max_grad_norm_clips_the_total_gradient_norm(data_paths, kohya_folder):
    """kohya's and diffusers' default clips at 1.0; with SGD the first step moves lora_up (zero
    at start) by exactly lr x the clipped gradient, so the step scales with the clip norm."""
    def first_step_norm(max_grad_norm: float, name: str) -> tuple[float, dict]:
        path = run(lora_config(kohya_folder, output_name=name, max_train_steps=1,
                               optimizer_type="SGDNesterov", learning_rate=0.5,
                               max_grad_norm=max_grad_norm), RecordingContext(data_paths))
        state, meta = load_lora(path)
        ups = [t.float() for k, t in state.items() if "lora_up" in k]
        return float(torch.sqrt(sum((t ** 2).sum() for t in ups))), meta

    free, free_meta = first_step_norm(0.0, "free")
    small, small_meta = first_step_norm(1e-6, "small")
    double, _ = first_step_norm(2e-6, "double")
    assert free_meta["ss_max_grad_norm"] == "None" and small_meta["ss_max_grad_norm"] == "1e-06"
    assert 0 < small < free / 100
    assert double / small == pytest.approx(2.0, rel=1e-3)
    assert LoraConfig().max_grad_norm == 1.0
    with pytest.raises(ConfigError, match="max_grad_norm"):
        lora_config(kohya_folder, max_grad_norm=-1.0)


def test_state_shape_check_for_sidecars_with_and_without_recorded_shapes():
    from trainers.loop import _check_state_shapes
    weight = torch.nn.Parameter(torch.zeros(8, 4))
    optimizer = torch.optim.AdamW([weight])
    optimizer.state[weight] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(8, 4),
                               "exp_avg_sq": torch.zeros(8, 4), "qmap1": torch.zeros(256)}
    _check_state_shapes(optimizer)  # an older sidecar: only the mirrored entries are compared
    _check_state_shapes(optimizer, [[8, 4]])
    with pytest.raises(ValueError, match=r"\[8, 2\] for parameter 0 of shape \[8, 4\]"):
        _check_state_shapes(optimizer, [[8, 2]])
    optimizer.state[weight]["exp_avg"] = torch.zeros(8, 2)
    with pytest.raises(ValueError, match=r"state of shape \[8, 2\]"):
        _check_state_shapes(optimizer)
