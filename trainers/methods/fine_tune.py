"""Native fine-tuning (kohya's fine_tune mode): captions and tags from a metadata JSON, bucketed
latents cached as `<stem>.npz` beside the images, the whole U-Net (and optionally the text
encoder) trained with DreamBooth's code and saved as one original-layout .safetensors."""
from __future__ import annotations

from pathlib import Path

from core import events as ev
from core.config import ConfigError
from core.paths import PathError
from trainers import finetune_data
from trainers import kohya_training as kt
from trainers.configs import FineTuneConfig
from trainers.data import DatasetError
from trainers.finetune_metadata import MetadataError, load_metadata
from trainers.kohya_data import plain_dataset
from trainers.methods.dreambooth import load_for_training, train_full_model


def check_paths(cfg: FineTuneConfig, paths) -> tuple[Path, Path]:
    """(image folder, metadata JSON), or a ConfigError naming each problem."""
    kt.check_paths(cfg, paths)
    problems = []
    image_dir = paths.resolve(cfg.train_data_dir, "train_data_dir")
    try:
        in_json = paths.resolve(cfg.in_json, "in_json")
        if not in_json.is_file():
            problems.append(f"in_json: {in_json} does not exist (make it with 'Make metadata JSON')")
    except PathError as error:
        problems.append(str(error))
    if problems:
        raise ConfigError(problems)
    return image_dir, in_json


def dataset_config(cfg: FineTuneConfig, image_dir: Path, mask_dir: Path | None = None):
    options = kt.general_options(cfg)
    options.pop("caption_extension")  # captions come from the JSON
    return plain_dataset(image_dir, cfg.dataset_repeats, mask_dir=mask_dir, **options)


def check_dataset(cfg: FineTuneConfig, paths):
    """Everything short of loading the model: (dataset config, metadata, JSON path). Missing
    files, bad JSON keys and unlisted images fail here, before a job is queued or a model loads."""
    image_dir, in_json = check_paths(cfg, paths)
    try:
        metadata = load_metadata(in_json)
    except MetadataError as error:
        raise ConfigError(error.user_message) from None
    config = dataset_config(cfg, image_dir, kt.mask_folder(cfg, paths))
    try:
        finetune_data.scan_metadata(config, metadata)
    except DatasetError as error:
        raise ConfigError(str(error)) from None
    return config, metadata, in_json


def run(cfg: FineTuneConfig, ctx) -> Path:
    cfg.validate()
    config, metadata, in_json = check_dataset(cfg, ctx.paths)
    path = kt.output_path(ctx.paths.stable_diffusion, cfg.output_name, ".safetensors")
    model, start, base_config = load_for_training(cfg, ctx, path)
    ctx.emit(ev.Status("Caching latents to .npz beside the images"))
    batches, encoded = finetune_data.prepare(config, metadata, model.vae, cfg.seed,
                                             report=lambda text: ctx.emit(ev.Status(text)))
    ctx.emit(ev.Status(f"{len(metadata)} images from {in_json.name}: {encoded} encoded, "
                       f"{len(metadata) - encoded} latents read from .npz"))
    for note in batches.datasets[0].notes:
        ctx.emit(ev.Status(note))
    return train_full_model(cfg, ctx, model, batches, path, start, base_config, "fine_tune")
