"""What textual inversion and hypernetworks share (A1111's Train tab): model and dataset
preparation, prompt templates, schedule-string learning rates and one preview prompt."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from core import events as ev
from core.config import ConfigError
from core.images import describe_skipped
from trainers import distributed, models, seeds
from trainers.captions import make_prompt, read_template
from trainers.configs import TemplateTrainingConfig
from trainers.data import Dataset, DatasetError, load_dataset
from trainers.loop import Batch, LoopOptions
from trainers.models import BaseModel, load_model
from trainers.preflight import check_before_queueing
from trainers.sampling import PreviewSettings
from trainers.schedule import parse_schedule
from trainers.validation import Validation, ValidationError, split_indices


@dataclass
class TemplateBatches:
    dataset: Dataset
    template_lines: list[str]
    name: str
    cfg: TemplateTrainingConfig

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.batches_per_epoch

    def batch(self, micro: int) -> Batch:
        chosen = self.dataset.indices(micro)
        texts = [make_prompt(self.template_lines, self.name, self.dataset.examples[i].filewords,
                             seeds.rng(self.cfg.seed, "prompt", micro, i), self.cfg.shuffle_tags,
                             self.cfg.tag_drop_out) for i in chosen]
        return Batch(self.dataset.latents(micro, chosen), texts, self.dataset.weights(chosen),
                     pixels=self.dataset.pixels(chosen))

    def validation_batches(self) -> list[Batch]:
        """One fixed batch per held-out image: its mean latent when latents are sampled per
        step, a prompt of the template drawn once (no tag shuffle or drop-out)."""
        seed = validation_seed(self.cfg)
        out = []
        for index, example in enumerate(self.dataset.held_out):
            text = make_prompt(self.template_lines, self.name, example.filewords,
                               seeds.rng(seed, "validation prompt", index))
            latent = example.mean if self.dataset.latent_sampling == "random" else example.latent
            out.append(Batch(latent[None], [text],
                             example.weight[None] if example.weight is not None else None))
        return out


def prepare(cfg: TemplateTrainingConfig, ctx,
            keep_pixels: bool = False) -> tuple[BaseModel, Dataset, list[str]]:
    cfg.validate()
    paths = ctx.paths
    check_before_queueing(cfg, paths)
    if problems := models.precision_problems(cfg.mixed_precision):
        raise ConfigError(problems)
    template_lines = read_template(paths.templates, cfg.template)
    ctx.emit(ev.Status(f"Loading model {cfg.model}"))
    with distributed.main_first(ctx):  # the main process builds a missing model first
        model = load_model(paths, cfg.model, frozen_dtype=cfg.frozen_dtype())
    ctx.emit(ev.Status("Preparing dataset"))
    processes = distributed.processes(ctx)  # data-parallel: each step draws batch x processes
    if processes > 1 and cfg.varsize:
        raise DatasetError("varsize: 'do not resize images' trains one image of its own size per "
                           "step, which cannot be split across processes; train in one process")
    try:
        dataset = load_dataset(paths.resolve(cfg.data_root, "data_root"), model.vae, cfg.width,
                               cfg.height, varsize=cfg.varsize, batch_size=cfg.batch_size * processes,
                               seed=cfg.seed, latent_sampling=cfg.latent_sampling,
                               use_weight=cfg.use_weight, word_regex=cfg.filename_word_regex,
                               join_string=cfg.filename_join_string,
                               report=lambda text: ctx.emit(ev.Status(text)),
                               keep_pixels=keep_pixels, mask_dir=mask_folder(cfg, paths),
                               alpha_mask=cfg.alpha_mask)
    except DatasetError as error:
        if processes == 1 or not str(error).startswith("batch_size"):
            raise
        raise DatasetError(f"{error} (batch size {cfg.batch_size} per process x {processes} "
                           "processes)") from None
    if dataset.skipped:
        ctx.emit(ev.Status(describe_skipped(dataset.skipped)))
    hold_out(cfg, paths, dataset, model.vae, ctx)
    return model, dataset, template_lines


def validation_seed(cfg) -> int:
    return cfg.validation_seed if cfg.validation_seed >= 0 else cfg.seed


def hold_out(cfg: TemplateTrainingConfig, paths, dataset: Dataset, vae, ctx) -> None:
    """The validation images: a held-out share of the dataset (never trained on) or a folder."""
    if cfg.validation_split:
        try:
            keep, held = split_indices([e.path.name for e in dataset.examples],
                                       cfg.validation_split, validation_seed(cfg))
        except ValidationError as error:
            raise DatasetError(str(error)) from None
        if len(keep) < dataset.batch_size:
            raise DatasetError(f"batch_size: {dataset.batch_size} is larger than the {len(keep)} "
                               f"images left to train on after validation_split holds out "
                               f"{len(held)}")
        dataset.held_out = [dataset.examples[i] for i in held]
        dataset.examples = [dataset.examples[i] for i in keep]
    elif cfg.validation_data_dir.strip():
        folder = paths.resolve(cfg.validation_data_dir, "validation_data_dir")
        try:
            dataset.held_out = load_dataset(
                folder, vae, cfg.width, cfg.height, varsize=cfg.varsize, batch_size=1,
                seed=cfg.seed, latent_sampling=cfg.latent_sampling, use_weight=cfg.use_weight,
                word_regex=cfg.filename_word_regex, join_string=cfg.filename_join_string,
                alpha_mask=cfg.alpha_mask).examples
        except DatasetError as error:
            raise DatasetError(str(error).replace("data_root:", "validation_data_dir:", 1)) from None
    if dataset.held_out:
        ctx.emit(ev.Status(f"Validation loss on {len(dataset.held_out)} image(s) every "
                           f"{cfg.validate_every_n_steps} steps"))


def validation(cfg) -> Validation | None:
    """The loop's validation settings (the batches come from the batch source)."""
    if not (cfg.validation_split or cfg.validation_data_dir.strip()):
        return None
    return Validation(batches=None, every=cfg.validate_every_n_steps, seed=validation_seed(cfg))


def mask_folder(cfg: TemplateTrainingConfig, paths) -> Path | None:
    """The mask folder of masked loss (None when masks come from alpha, or are off)."""
    if not cfg.masked_loss:
        return None
    return paths.resolve(cfg.conditioning_data_dir, "conditioning_data_dir")


def rates(cfg: TemplateTrainingConfig):
    schedule = parse_schedule(cfg.learn_rate, cfg.steps)

    def at(step: int) -> list[float] | None:
        rate = schedule.rate(step)
        return None if rate is None else [rate]
    return at


def loop_options(cfg: TemplateTrainingConfig, model: BaseModel, csv_name: str,
                 extra: dict) -> LoopOptions:
    clip = (parse_schedule(cfg.clip_grad_value, cfg.steps, "clip_grad_value", allow_zero=True)
            if cfg.clip_grad_mode != "disabled" else None)
    return LoopOptions(
        steps=cfg.steps, accumulation=cfg.gradient_accumulation, seed=cfg.seed,
        save_every=cfg.save_every, preview_every=cfg.preview_every,
        log_directory=cfg.log_directory, csv_name=csv_name, clip_mode=cfg.clip_grad_mode,
        clip_value=(lambda step: clip.rate(step) or 0.0) if clip else (lambda step: 0.0),
        on_nan=cfg.on_nan, validation=validation(cfg), log_with=cfg.log_with,
        autocast=autocast_dtype(cfg.mixed_precision),
        settings={"config": asdict(cfg), "model": model.name, "model_hash": model.short_hash,
                  **extra})


def autocast_dtype(precision: str):
    """The loop's autocast dtype for a mixed precision ("no": none, fp32)."""
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def previews(cfg: TemplateTrainingConfig, fallback: str):
    def settings(step: int, texts: list[str]) -> list[PreviewSettings]:
        return [PreviewSettings(prompt=cfg.preview_prompt or (texts[0] if texts else fallback),
                                negative=cfg.preview_negative, seed=cfg.preview_seed,
                                steps=cfg.preview_steps, cfg=cfg.preview_cfg,
                                sampler=cfg.preview_sampler, width=cfg.width, height=cfg.height)]
    return settings
