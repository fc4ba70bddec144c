"""What LoRA and DreamBooth share (kohya's options): datasets with repeats and buckets,
optimizer and LR-scheduler registries, mixed precision, sample prompts, memory options."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import asdict
from pathlib import Path

import torch

from core import events as ev
from core.config import ConfigError
from core.paths import PathError
from trainers import distributed, kohya_data, models, resident
from trainers.configs import KohyaTrainingConfig
from trainers.loop import LoopOptions, TrainingError
from trainers.lr_schedulers import schedule_rates
from trainers.models import BaseModel, load_model, overridden
from trainers.conditioning import PooledCondition, prompt_encoder, stack_conditions
from trainers.sample_prompts import parse_sample_prompts
from trainers.sampling import PreviewSettings

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_paths(cfg: KohyaTrainingConfig, paths) -> None:
    problems = []
    if cfg.dataset_config.strip():
        try:
            toml = paths.resolve(cfg.dataset_config, "dataset_config")
            if not toml.is_file():
                problems.append(f"dataset_config: {toml} does not exist")
        except PathError as error:
            problems.append(str(error))
    else:
        try:
            folder = paths.resolve(cfg.train_data_dir, "train_data_dir")
            if not folder.is_dir():
                problems.append(f"train_data_dir: {folder} is not a folder")
        except PathError as error:
            problems.append(str(error))
        if cfg.reg_data_dir.strip():
            try:
                folder = paths.resolve(cfg.reg_data_dir, "reg_data_dir")
                if not folder.is_dir():
                    problems.append(f"reg_data_dir: {folder} is not a folder")
            except PathError as error:
                problems.append(str(error))
    try:
        paths.resolve(cfg.log_directory, "log_directory")
    except PathError as error:
        problems.append(str(error))
    problems += models.precision_problems(cfg.mixed_precision)
    if cfg.attention == "xformers":
        problems += _xformers_problems()
    if problems:
        raise ConfigError(problems)


def _xformers_problems() -> list[str]:
    if not torch.cuda.is_available():
        return ["attention: xformers needs a CUDA GPU; choose sdpa"]
    try:
        import xformers  # noqa: F401
    except ImportError:
        return ["attention: the xformers package is not installed (pip install xformers); "
                "choose sdpa"]
    return []


def general_options(cfg: KohyaTrainingConfig) -> dict:
    """The form's dataset settings as kohya [general] keys."""
    return dict(resolution=cfg.resolution, batch_size=cfg.train_batch_size,
                   enable_bucket=cfg.enable_bucket, min_bucket_reso=cfg.min_bucket_reso,
                   max_bucket_reso=cfg.max_bucket_reso, bucket_reso_steps=cfg.bucket_reso_steps,
                   bucket_no_upscale=cfg.bucket_no_upscale, shuffle_caption=cfg.shuffle_caption,
                   keep_tokens=cfg.keep_tokens, caption_dropout_rate=cfg.caption_dropout_rate,
                   caption_tag_dropout_rate=cfg.caption_tag_dropout_rate, flip_aug=cfg.flip_aug,
                   caption_extension=cfg.caption_extension, alpha_mask=cfg.alpha_mask,
                   validation_split=cfg.validation_split,
                   **({"validation_seed": cfg.validation_seed} if cfg.validation_seed >= 0 else {}))


def validation_config(cfg: KohyaTrainingConfig, paths):
    """The validation folder as a dataset of one subset (its images are all held out)."""
    if not cfg.validation_data_dir.strip():
        return None
    folder = paths.resolve(cfg.validation_data_dir, "validation_data_dir")
    options = {k: v for k, v in general_options(cfg).items()
               if k not in ("validation_split", "validation_seed")}
    return kohya_data.plain_dataset(folder, **options)


def validation(cfg: KohyaTrainingConfig):
    """The loop's validation settings (the batches come from KohyaBatches; a dataset TOML may
    hold images out with its own validation_split)."""
    from trainers.validation import Validation
    if not (cfg.validation_split or cfg.validation_data_dir.strip()
            or cfg.validate_every_n_steps):
        return None
    return Validation(batches=None, every=cfg.validate_every_n_steps,
                      seed=cfg.validation_seed if cfg.validation_seed >= 0 else cfg.seed)


def mask_folder(cfg: KohyaTrainingConfig, paths) -> Path | None:
    """The form's mask folder of masked loss (a dataset TOML names its own per subset)."""
    if not cfg.masked_loss or not cfg.conditioning_data_dir.strip():
        return None
    return paths.resolve(cfg.conditioning_data_dir, "conditioning_data_dir")


def dataset_configs(cfg: KohyaTrainingConfig, paths) -> list:
    general = general_options(cfg)
    if cfg.dataset_config.strip():
        configs = kohya_data.load_dataset_toml(paths.resolve(cfg.dataset_config, "dataset_config"),
                                               defaults=general, masked_loss=cfg.masked_loss)
        for config in configs:  # folders named inside the TOML obey the same confinement
            for subset in config.subsets:
                paths.resolve(subset.image_dir, "dataset_config image_dir")
                if subset.conditioning_data_dir is not None:
                    paths.resolve(subset.conditioning_data_dir,
                                  "dataset_config conditioning_data_dir")
        return configs
    reg = paths.resolve(cfg.reg_data_dir, "reg_data_dir") if cfg.reg_data_dir.strip() else None
    return [kohya_data.folder_dataset(paths.resolve(cfg.train_data_dir, "train_data_dir"), reg,
                                      mask_dir=mask_folder(cfg, paths), **general)]


def with_schedule(cfg: KohyaTrainingConfig, model: BaseModel) -> BaseModel:
    """The model as this run sees it: its noise schedule with the config's overrides (a v
    target, zero terminal SNR) on a copy sharing the modules, so the cached model keeps its own.
    Raises TrainingError for a weighting that needs v-prediction on an epsilon model."""
    overrides = cfg.scheduler_overrides()
    if overrides and model.spec.prediction == "flow":
        raise TrainingError(f"{', '.join(sorted(_FIELDS[k] for k in overrides))}: "
                            f"{model.spec.label} is a flow-matching model (noise schedules of "
                            "SD models only)")
    if overrides:
        model = dataclasses.replace(model, scheduler_config=overridden(model.scheduler_config,
                                                                       overrides))
    if cfg.scale_v_pred_loss_like_noise_pred and model.prediction_type != "v_prediction":
        raise TrainingError("scale_v_pred_loss_like_noise_pred: applies to v-prediction; "
                            f"{model.name} predicts {model.prediction_type} (tick "
                            "v_parameterization for a v model whose file does not say so)")
    return model


def schedule_metadata(cfg: KohyaTrainingConfig) -> dict[str, str]:
    """kohya's metadata for the schedule and loss options a run used (only those set, so the
    files of runs without them stay as they were)."""
    keys = {"ss_zero_terminal_snr": cfg.zero_terminal_snr,
            "ss_debiased_estimation": cfg.debiased_estimation_loss,
            "ss_scale_v_pred_loss_like_noise_pred": cfg.scale_v_pred_loss_like_noise_pred}
    return {key: "True" for key, on in keys.items() if on}


_FIELDS = {"prediction_type": "v_parameterization", "rescale_betas_zero_snr": "zero_terminal_snr",
           "timestep_spacing": "zero_terminal_snr"}


def prepare(cfg: KohyaTrainingConfig, ctx, prior_loss_weight: float = 1.0):
    """Validate, load the model (its frozen weights stored as the config says) and cache the
    dataset's latents: (model, batches)."""
    cfg.validate()
    check_paths(cfg, ctx.paths)
    configs = global_batches(dataset_configs(cfg, ctx.paths), ctx)
    with distributed.main_first(ctx):  # the main process builds model and latent caches first
        ctx.emit(ev.Status(f"Loading model {cfg.model}"))
        model = with_schedule(cfg, load_model(ctx.paths, cfg.model,
                                              frozen_dtype=cfg.frozen_dtype()))
        ctx.emit(ev.Status("Caching latents"))
        batches = kohya_data.prepare_datasets(configs, model.vae, seed=cfg.seed,
                                              cache_to_disk=cfg.cache_latents_to_disk,
                                              prior_loss_weight=prior_loss_weight,
                                              report=lambda text: ctx.emit(ev.Status(text)),
                                              validation=validation_config(cfg, ctx.paths))
    resident.page_out(model.vae)  # latents are cached: the steps never read the VAE
    for dataset in batches.datasets:
        for note in dataset.notes:
            ctx.emit(ev.Status(note))
    return model, batches


def global_batches(configs: list, ctx) -> list:
    """Data-parallel: each step draws batch size x processes images (kohya's batch size is per
    GPU), and every process trains its share of them."""
    count = distributed.processes(ctx)
    if count > 1:
        for config in configs:
            config.batch_size *= count
        ctx.emit(ev.Status(f"Training on {count} processes: each step trains {count} x the batch "
                           "size, the processes' gradients averaged"))
    return configs


def total_steps(cfg: KohyaTrainingConfig, batches) -> int:
    if cfg.max_train_epochs:
        per_epoch = math.ceil(batches.batches_per_epoch / cfg.gradient_accumulation_steps)
        return cfg.max_train_epochs * per_epoch
    return cfg.max_train_steps


def steps_per_epoch(cfg: KohyaTrainingConfig, batches) -> int:
    return max(1, math.ceil(batches.batches_per_epoch / cfg.gradient_accumulation_steps))


def rates(cfg: KohyaTrainingConfig, base_lrs: list[float], steps: int):
    return schedule_rates(cfg.lr_scheduler, base_lrs, steps, cfg.lr_warmup_steps,
                          cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power,
                          reference_lr=cfg.learning_rate)


def offloader(cfg: KohyaTrainingConfig, model: BaseModel, trains_text_encoder: bool):
    """What leaves the device during the steps (trainers/offload.py): the VAE (latents are
    always cached), the text encoders when their outputs are."""
    from trainers.offload import Offloader, leaving_device
    return Offloader(model, leaving_device(
        latents_cached=True, trains_text_encoder=trains_text_encoder,
        text_outputs_cached=cfg.text_outputs_cached(trains_text_encoder)))


def encoder_for(cfg: KohyaTrainingConfig, model: BaseModel, trains_text_encoder: bool,
                visit=contextlib.nullcontext):
    """captions -> context; frozen text encoders run without grad, optionally memoized.
    `visit()` brings offloaded text encoders back for a caption the memo has not seen."""
    encoder = prompt_encoder(model, clip_skip=cfg.clip_skip, max_tokens=cfg.max_token_length,
                             chunking="kohya")
    if trains_text_encoder:
        return encoder, encoder.encode
    cached = cfg.text_outputs_cached(trains_text_encoder)
    memo: dict[str, object] = {}

    def encode(texts: list[str]):
        with torch.no_grad():
            if not cached:
                return encoder.encode(texts)
            missing = [t for t in dict.fromkeys(texts) if t not in memo]
            if missing:
                with visit():
                    encoded = encoder.encode(missing)
                rows = encoded.rows() if isinstance(encoded, PooledCondition) else encoded
                for text, row in zip(missing, rows):
                    memo[text] = row
            rows = [memo[t] for t in texts]
            return stack_conditions(rows)
    return encoder, encode


def previews(cfg: KohyaTrainingConfig, fallback: str):
    defaults = PreviewSettings(prompt=fallback, seed=cfg.seed, steps=20, cfg=7.0,
                               sampler=cfg.sample_sampler, width=cfg.resolution,
                               height=cfg.resolution)
    listed = parse_sample_prompts(cfg.sample_prompts, defaults)

    def settings(step: int, texts: list[str]) -> list[PreviewSettings]:
        if listed:
            return listed
        return [PreviewSettings(**{**defaults.__dict__, "prompt": texts[0] if texts else fallback})]
    return settings


@contextlib.contextmanager
def memory_options(cfg: KohyaTrainingConfig, model: BaseModel, trains_text_encoder: bool):
    """Gradient checkpointing, the attention kernel and block swap for the run; undone
    afterwards, since the base model is cached between runs."""
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if trains_text_encoder:
            for text_encoder in model.text_encoders:
                text_encoder.gradient_checkpointing_enable()
    if cfg.attention == "xformers":
        model.unet.enable_xformers_memory_efficient_attention()
    try:
        with block_swap(cfg, model):
            yield
    finally:
        if cfg.gradient_checkpointing:
            model.unet.disable_gradient_checkpointing()
            if trains_text_encoder:
                for text_encoder in model.text_encoders:
                    text_encoder.gradient_checkpointing_disable()
        if cfg.attention == "xformers":
            model.unet.disable_xformers_memory_efficient_attention()


def block_swap(cfg: KohyaTrainingConfig, model: BaseModel):
    """The denoiser's last `blocks_to_swap` blocks swapped in from CPU memory while entered
    (trainers/block_swap.py); nothing for 0. Install it after the adapters: what trains then
    stays on the device."""
    count = getattr(cfg, "blocks_to_swap", 0)
    if not count:
        return contextlib.nullcontext()
    from trainers.block_swap import BlockSwap, BlockSwapError
    try:
        return BlockSwap(model.unet, count)
    except BlockSwapError as error:
        raise TrainingError(str(error)) from None


def check_block_swap(cfg: KohyaTrainingConfig, model: BaseModel) -> None:
    """A block count the denoiser does not have is refused before anything trains."""
    if getattr(cfg, "blocks_to_swap", 0):
        from trainers.block_swap import BlockSwapError, check_count
        try:
            check_count(cfg.blocks_to_swap, model.unet)
        except BlockSwapError as error:
            raise TrainingError(str(error)) from None


def loop_options(cfg: KohyaTrainingConfig, model: BaseModel, batches, steps: int,
                 extra: dict) -> LoopOptions:
    per_epoch = steps_per_epoch(cfg, batches)
    save_every = cfg.save_every_n_steps or cfg.save_every_n_epochs * per_epoch
    preview_every = cfg.sample_every_n_steps or cfg.sample_every_n_epochs * per_epoch
    return LoopOptions(
        steps=steps, accumulation=cfg.gradient_accumulation_steps, seed=cfg.seed,
        save_every=save_every, preview_every=preview_every, log_directory=cfg.log_directory,
        csv_name="loss.csv", min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset,
        autocast=AUTOCAST[cfg.mixed_precision], optimizer_name=cfg.optimizer_type,
        keep_loss_scale=getattr(cfg, "full_fp16", False),
        preview_at_start=cfg.sample_at_first, keep_last=cfg.save_last_n, on_nan=cfg.on_nan,
        clip_mode="norm" if cfg.max_grad_norm > 0 else "disabled",
        clip_value=lambda step: cfg.max_grad_norm,
        flow=cfg.flow_options() if hasattr(cfg, "flow_options") else None,
        noise=cfg.noise_weighting(), validation=validation(cfg), log_with=cfg.log_with,
        settings={"config": asdict(cfg), "model": model.name, "model_hash": model.short_hash,
                  "images": batches.num_train_images, **extra})


def output_path(folder: Path, name: str, suffix: str) -> Path:
    return folder / f"{name.strip()}{suffix}"
