"""The training loop every method shares: schedule -> steps -> previews and saves -> final save.

A method hands the loop a TrainingPlan: what trains, how captions become conditioning, and how
its file is written. Randomness is counter-based (trainers/seeds.py), so a run interrupted at
step k and resumed from its saved file and .optim sidecar repeats the same steps exactly."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from core import events as ev
from trainers import seeds
from trainers.captions import make_prompt
from trainers.configs import TemplateTrainingConfig
from trainers.data import Dataset
from trainers.formats.optim_sidecar import load_optim, save_optim
from trainers.run_folder import RunFolder
from trainers.sampling import PreviewSettings, render
from trainers.schedule import parse_schedule
from trainers.step import diffusion_loss


class TrainingError(RuntimeError):
    def __init__(self, message: str):
        super().__init__(message)
        self.user_message = message


@dataclass
class TrainingPlan:
    name: str  # the word in prompts and the file name
    parameters: list[torch.nn.Parameter]
    weight_decay: float
    encode: Callable[[list[str]], torch.Tensor]  # captions -> U-Net context, with grad
    prompt_encoder: object  # PromptEncoder used for previews
    save: Callable[[Path, int], None]  # write the method's file for `step` steps done
    checksum: Callable[[], str]
    final_path: Path
    copies_folder: str  # name of the run sub-folder for periodic copies
    start_step: int = 0
    unet: object = None  # the U-Net to train through (a method may wrap it)
    on_preview: Callable[[object, int, "RunFolder"], None] | None = None
    describe: dict = field(default_factory=dict)


def _set_rate(optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate


def _clip(parameters, mode: str, value: float) -> None:
    if mode == "value":
        torch.nn.utils.clip_grad_value_(parameters, value)
    elif mode == "norm":
        torch.nn.utils.clip_grad_norm_(parameters, value)


def train(cfg: TemplateTrainingConfig, model, dataset: Dataset, template_lines: list[str],
          plan: TrainingPlan, ctx, csv_name: str) -> Path:
    unet = plan.unet or model.unet
    noise_scheduler = model.noise_scheduler()
    schedule = parse_schedule(cfg.learn_rate, cfg.steps)
    clip_schedule = (parse_schedule(cfg.clip_grad_value, cfg.steps, "clip_grad_value", allow_zero=True)
                     if cfg.clip_grad_mode != "disabled" else None)
    optimizer = torch.optim.AdamW(plan.parameters, lr=schedule.pieces[0][0],
                                  weight_decay=plan.weight_decay)
    start = plan.start_step
    state, reason = load_optim(plan.final_path, plan.checksum())
    if state is not None:
        optimizer.load_state_dict(state["optimizer_state_dict"])
        ctx.emit(ev.Status(f"Resuming at step {start} with the saved optimizer state"))
    elif start:
        ctx.emit(ev.Status(f"Continuing at step {start} with a fresh optimizer ({reason})"))

    run = RunFolder.create(ctx.paths.resolve(cfg.log_directory, "log_directory"), plan.name, csv_name)
    run.write_settings(start, {"method": plan.copies_folder, "config": vars(cfg).copy(),
                               "model": model.name, "model_hash": model.short_hash,
                               "images": len(dataset.examples), "start_step": start,
                               **plan.describe})
    if start >= cfg.steps or schedule.rate(start) is None:
        raise TrainingError(f"steps: the file is already at step {start}, and max steps is "
                            f"{cfg.steps} / the learning-rate schedule ends at {schedule.end}; "
                            "raise max steps or extend the schedule to train further")
    per_epoch = dataset.batches_per_epoch
    accumulation = cfg.gradient_accumulation
    step = start
    began = time.perf_counter()
    last_texts: list[str] = []

    def save(kind: str) -> Path:
        plan.save(plan.final_path, step)
        save_optim(plan.final_path, plan.checksum(), "AdamW", optimizer.state_dict(),
                   extra={"seed": cfg.seed, "step": step})
        run.flush()
        ctx.emit(ev.Saved(step=step, path=str(plan.final_path), kind=kind))
        return plan.final_path

    unet.train()
    while step < cfg.steps:
        if ctx.should_stop():
            ctx.emit(ev.Status(f"Interrupted at step {step}"))
            break
        rate = schedule.rate(step)
        if rate is None:
            ctx.emit(ev.Status(f"Learning-rate schedule finished at step {step}"))
            break
        _set_rate(optimizer, rate)
        total_loss = 0.0
        for k in range(accumulation):
            micro = step * accumulation + k
            chosen = dataset.indices(micro)
            texts = [make_prompt(template_lines, plan.name, dataset.examples[i].filewords,
                                 seeds.rng(cfg.seed, "prompt", micro, i), cfg.shuffle_tags,
                                 cfg.tag_drop_out) for i in chosen]
            context = plan.encode(texts)
            loss = diffusion_loss(unet, noise_scheduler, dataset.latents(micro, chosen), context,
                                  seeds.generator(cfg.seed, "noise", micro),
                                  weight=dataset.weights(chosen))
            (loss / accumulation).backward()
            total_loss += loss.item() / accumulation
            last_texts = texts
        if not math.isfinite(total_loss):
            optimizer.zero_grad(set_to_none=True)
            if step > start:
                save("last good state")
            raise TrainingError(f"loss became {total_loss} at step {step + 1}; the file keeps the "
                                f"state of step {step}. Try a lower learning rate.")
        if clip_schedule is not None:
            _clip(plan.parameters, cfg.clip_grad_mode, clip_schedule.rate(step) or 0.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        epoch, epoch_step = divmod(step * accumulation, per_epoch * accumulation)
        run.log_loss(step, epoch, epoch_step // accumulation, total_loss, rate)
        ctx.emit(ev.Progress(step=step, total=cfg.steps, loss=total_loss, learn_rate=rate,
                             epoch=epoch, epoch_step=epoch_step // accumulation,
                             start_step=start, elapsed=time.perf_counter() - began))
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            copy = run.sub(plan.copies_folder) / f"{plan.name}-{step}{plan.final_path.suffix}"
            plan.save(copy, step)
            save("checkpoint")
            ctx.emit(ev.Saved(step=step, path=str(copy), kind="copy"))
        if cfg.preview_every and step % cfg.preview_every == 0:
            preview(cfg, model, plan, unet, run, step, last_texts, ctx)
    path = save("final")
    ctx.emit(ev.Finished(step=step, path=str(path),
                         message=f"Training {'interrupted' if ctx.should_stop() else 'finished'} "
                                 f"at step {step}; saved {path}"))
    return path


def preview(cfg, model, plan: TrainingPlan, unet, run: RunFolder, step: int, texts: list[str], ctx):
    settings = PreviewSettings(prompt=cfg.preview_prompt or (texts[0] if texts else plan.name),
                               negative=cfg.preview_negative, seed=cfg.preview_seed,
                               steps=cfg.preview_steps, cfg=cfg.preview_cfg,
                               sampler=cfg.preview_sampler, width=cfg.width, height=cfg.height)
    image, seed = render(model, plan.prompt_encoder, settings, unet=unet)
    path = run.sub("images") / f"{plan.name}-{step}.png"
    image.save(path)
    if plan.on_preview is not None:
        plan.on_preview(image, step, run)
    ctx.emit(ev.Preview(step=step, path=str(path), caption=f"step {step}, seed {seed}: {settings.prompt}"))
