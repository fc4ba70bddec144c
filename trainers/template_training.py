"""What textual inversion and hypernetworks share (A1111's Train tab): model and dataset
preparation, prompt templates, schedule-string learning rates and one preview prompt."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from core import events as ev
from core.images import describe_skipped
from trainers import distributed, seeds
from trainers.captions import make_prompt, read_template
from trainers.configs import TemplateTrainingConfig
from trainers.data import Dataset, DatasetError, load_dataset
from trainers.loop import Batch, LoopOptions
from trainers.models import BaseModel, load_model
from trainers.preflight import check_before_queueing
from trainers.sampling import PreviewSettings
from trainers.schedule import parse_schedule


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


def prepare(cfg: TemplateTrainingConfig, ctx,
            keep_pixels: bool = False) -> tuple[BaseModel, Dataset, list[str]]:
    cfg.validate()
    paths = ctx.paths
    check_before_queueing(cfg, paths)
    template_lines = read_template(paths.templates, cfg.template)
    ctx.emit(ev.Status(f"Loading model {cfg.model}"))
    with distributed.main_first(ctx):  # the main process builds a missing model first
        model = load_model(paths, cfg.model)
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
    return model, dataset, template_lines


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
        on_nan=cfg.on_nan,
        settings={"config": asdict(cfg), "model": model.name, "model_hash": model.short_hash,
                  **extra})


def previews(cfg: TemplateTrainingConfig, fallback: str):
    def settings(step: int, texts: list[str]) -> list[PreviewSettings]:
        return [PreviewSettings(prompt=cfg.preview_prompt or (texts[0] if texts else fallback),
                                negative=cfg.preview_negative, seed=cfg.preview_seed,
                                steps=cfg.preview_steps, cfg=cfg.preview_cfg,
                                sampler=cfg.preview_sampler, width=cfg.width, height=cfg.height)]
    return settings
