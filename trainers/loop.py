"""The training loop every method shares: rates -> steps -> previews and saves -> final save.

A method hands the loop a TrainingPlan (what trains, how captions become conditioning, how its
file is written), a batch source and LoopOptions. Randomness is counter-based
(trainers/seeds.py), so a run interrupted at step k and resumed from its saved file and .optim
sidecar repeats the same steps exactly."""
from __future__ import annotations

import contextlib
import gc
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from core import crash_points
from core.atomic import atomic_write
from core import events as ev
from core.malloc_tuning import tune_malloc
from trainers import distributed, grad_check, seeds
from trainers.formats.optim_sidecar import load_optim, recover_pair, save_optim, saving_pair
from trainers.formats.save_check import SaveRefusedError
from trainers.last_good import LastGood
from trainers.loss_scaling import LossScaler
from trainers.conditioning import unet_inputs
from trainers.run_folder import RunFolder
from trainers.sampling import PreviewSettings, render
from trainers.step import diffusion_loss


class TrainingError(RuntimeError):
    def __init__(self, message: str):
        super().__init__(message)
        self.user_message = message


@dataclass
class Batch:
    latents: torch.Tensor
    texts: list[str]
    weights: torch.Tensor | None = None
    sizes: list | None = None  # SDXL: per image (original (h, w), crop (top, left), target (h, w))
    pixels: torch.Tensor | None = None  # [-1, 1] images, for a reconstruction loss


class BatchSource(Protocol):
    batches_per_epoch: int

    def batch(self, micro: int) -> Batch: ...


@dataclass
class LoopOptions:
    steps: int
    accumulation: int = 1
    seed: int = 0
    save_every: int = 0
    preview_every: int = 0
    log_directory: str = "outputs"
    csv_name: str = "loss.csv"
    clip_mode: str = "disabled"  # disabled | value | norm
    clip_value: Callable[[int], float] = lambda step: 0.0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    autocast: torch.dtype | None = None  # bf16 on CPU, fp16/bf16 on CUDA
    # full_fp16: the loss scale goes into the .optim sidecar, so a resumed run goes on with it
    keep_loss_scale: bool = False
    optimizer_name: str = "AdamW"
    preview_at_start: bool = False  # a step-0 baseline before training (kohya's sample_at_first)
    keep_last: int = 0  # keep only the newest N periodic copies; 0 keeps all
    on_nan: str = "stop"  # a NaN/inf loss or gradient: "stop" (keep the last good state) | "skip"
    settings: dict = field(default_factory=dict)  # written to settings-<step>.json
    flow: object = None  # FlowMatchingOptions, for a flow-matching family
    noise: object = None  # NoiseWeighting, for a noise-prediction family
    validation: object = None  # a Validation (trainers/validation.py): held-out loss every N
    log_with: str = "none"  # "tensorboard": also <run>/tensorboard/ (trainers/tensorboard_log.py)


@dataclass
class TrainingPlan:
    name: str  # the word in prompts and the file name
    optimizer: torch.optim.Optimizer
    rates: Callable[[int], list[float] | None]  # per param group for a 0-based step; None ends
    encode: Callable[[list[str]], torch.Tensor]  # captions -> U-Net context, with grad
    prompt_encoder: object  # PromptEncoder used for previews
    save: Callable[[Path, int], None]  # write the method's file for `step` steps done
    checksum: Callable[[], str]
    final_path: Path
    copies_folder: str  # name of the run sub-folder for periodic copies
    previews: Callable[[int, list[str]], list[PreviewSettings]]
    start_step: int = 0
    unet: object = None  # the U-Net to train through (a method may wrap it)
    unet_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    preview_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    on_preview: Callable[[object, int, RunFolder], None] | None = None
    trainable: Callable[[], list[torch.nn.Parameter]] | None = None
    sidecar_extra: Callable[[], dict] | None = None  # more to keep in .optim (e.g. fp32 weights)
    resume_optimizer: bool = True  # False when the user starts over on an existing file
    after_step: Callable[[int], None] | None = None  # e.g. an EMA update, after each step
    x0_loss: Callable[[Batch], Callable | None] | None = None  # a batch's loss on predicted x0
    state_tensors: Callable[[], list[torch.Tensor]] | None = None  # more that training changes
    # besides the trainable weights (an EMA), kept with them for a nan/inf stop
    offload: object = None  # an Offloader (trainers/offload.py): frozen parts off the device
    final_note: Callable[[Path], str] | None = None  # appended to the final message (a file check)
    fused: object = None  # a FusedBackward (trainers/fused_backward.py): steps during backward


# optimizer state entries shaped like their parameter (torch's and bitsandbytes' names); others,
# such as bitsandbytes' quantization maps or Adafactor's factored rows, have shapes of their own
MIRRORED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
                  "acc_delta", "state1", "state2")


def _param_shapes(optimizer) -> list[list[int]]:
    return [list(param.shape) for group in optimizer.param_groups for param in group["params"]]


def _check_state_shapes(optimizer, saved_shapes: list | None = None) -> None:
    """torch loads optimizer state of the wrong shapes silently; refuse it here instead. The
    sidecar records the parameters' shapes (since session 4); older ones are checked by the
    state entries that mirror their parameter."""
    if saved_shapes is not None:
        for index, (saved, now) in enumerate(zip(saved_shapes, _param_shapes(optimizer))):
            if list(saved) != now:
                raise ValueError(f"state of shape {list(saved)} for parameter {index} of shape {now}")
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if (key in MIRRORED_STATE and torch.is_tensor(value) and value.dim()
                        and value.shape != param.shape):
                    raise ValueError(f"state of shape {list(value.shape)} for a parameter of "
                                     f"shape {list(param.shape)}")


def _clip(parameters, mode: str, value: float) -> None:
    if mode == "value":
        torch.nn.utils.clip_grad_value_(parameters, value)
    elif mode == "norm":
        torch.nn.utils.clip_grad_norm_(parameters, value)


def _parameters(plan: TrainingPlan) -> list[torch.nn.Parameter]:
    if plan.trainable is not None:
        return plan.trainable()
    return [p for group in plan.optimizer.param_groups for p in group["params"]]


OUT_OF_MEMORY_ADVICE = ("To fit in memory: lower the batch size (raise gradient accumulation to "
                        "keep the effective batch), turn on gradient checkpointing, lower the "
                        "resolution, use an 8-bit optimizer (AdamW8bit), use mixed precision "
                        "(bf16 or fp16), or close other programs that use the GPU.")


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and not isinstance(error, TrainingError) and any(
        words in text for words in ("out of memory", "can't allocate memory",
                                    "cannot allocate memory"))


MAX_SKIPPED_IN_A_ROW = 10  # "skip" mode stops after this many bad steps in a row


def _release_memory(model, plan: TrainingPlan) -> None:
    """After running out of memory: drop every gradient (the base model is cached and the next
    job uses it) and give the freed blocks back to the device."""
    plan.optimizer.zero_grad(set_to_none=True)
    modules = [plan.unet] + [getattr(model, name, None)
                             for name in ("unet", "text_encoder", "text_encoder_2", "vae")]
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for parameter in module.parameters():
                parameter.grad = None
    for parameter in _parameters(plan):
        parameter.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train(model, data: BatchSource, plan: TrainingPlan, opts: LoopOptions, ctx) -> Path:
    """Run the loop; running out of memory ends the run with advice and saves nothing new."""
    tune_malloc()
    try:
        return _train(model, data, plan, opts, ctx)
    except Exception as error:
        if not _is_out_of_memory(error):
            raise
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    # outside the except block, so the failed step's tensors (held by the traceback) are gone
    _release_memory(model, plan)
    raise TrainingError(f"Out of memory ({detail}). Nothing new was saved: "
                        f"{plan.final_path.name} keeps its last saved state, and training can "
                        f"continue from it. {OUT_OF_MEMORY_ADVICE}")


def _train(model, data: BatchSource, plan: TrainingPlan, opts: LoopOptions, ctx) -> Path:
    return _Training(model, data, plan, opts, ctx).run()


class _Training:
    """One run of the loop. Its state — the step, the step the file on disk holds, the last
    good weights — lives here, and each part of a step is a method, so `run` reads top to
    bottom: resume, then per step: rates, micro-batches, the non-finite guard, the optimizer
    step, the periodic save and preview; then the final save."""

    def __init__(self, model, data: BatchSource, plan: TrainingPlan, opts: LoopOptions, ctx):
        self.model, self.data, self.plan, self.opts, self.ctx = model, data, plan, opts, ctx
        self.unet = plan.unet or model.unet
        self.objective = model.objective(opts.flow, opts.noise)
        self.predict = model.spec.hook("predict")
        self.start = self.step = plan.start_step
        self.parallel = distributed.of(ctx)  # None in a one-process run
        self.main = distributed.is_main(ctx)  # only the main process writes files
        self.folder: RunFolder | None = None
        self.saved_step: int | None = None  # the state the file holds
        self.stepped = False  # any good step yet
        self.skipped = 0  # bad steps in a row (on_nan="skip")
        self.tensorboard = None  # a TensorBoardLog when the run logs with TensorBoard

    # ------------------------------------------------------------------ the run
    def run(self) -> Path:
        try:
            return self._run()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _run(self) -> Path:
        plan, opts, ctx = self.plan, self.opts, self.ctx
        self._resume_optimizer()
        self._open_run_folder()
        self.per_epoch = self.data.batches_per_epoch
        if opts.validation is not None and opts.validation.batches is None:
            opts.validation.batches = self.data.validation_batches()
        if opts.validation is not None and not opts.validation.batches:
            opts.validation = None  # nothing held out (a dataset TOML without a split)
        began = time.perf_counter()
        last_texts: list[str] = []
        self.parameters = _parameters(plan)
        self.last_good = LastGood(self.parameters + (plan.state_tensors() if plan.state_tensors
                                                     else []), plan.optimizer)
        self.saved_step = self.start if plan.final_path.exists() else None
        # diffusers' unet.device / unet.dtype walk every sub-module: look them up once per run
        self.device, self.dtype = self.unet.device, self.unet.dtype
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
        self.scaler = (LossScaler(self.device.type) if opts.autocast == torch.float16 else None)
        if self.scaler is not None and self.saved_loss_scale:
            self.scaler.load_state_dict(self.saved_loss_scale)
        self.autocast = (torch.autocast(device_type=self.device.type, dtype=opts.autocast)
                         if opts.autocast is not None else contextlib.nullcontext())
        # data-parallel: DDP averages the gradients of the trainable parameters during backward
        if self.parallel is not None:
            self.step_loss = self.parallel.wrap(self.parameters, self._micro_loss)
            began = time.perf_counter()  # after waiting for the other processes (it/s, ETA)
        else:
            self.step_loss = self._micro_loss

        stopped = False
        self.unet.train()
        with plan.unet_context(), self._offloaded(), plan.fused or contextlib.nullcontext():
            if self.main and opts.preview_at_start and opts.preview_every and self.step == 0:
                self._preview(0, [])
            while self.step < opts.steps:
                if self._stopping():
                    stopped = True
                    ctx.emit(ev.Status(f"Interrupted at step {self.step}"))
                    break
                rates = plan.rates(self.step)
                if rates is None:
                    ctx.emit(ev.Status(f"Learning-rate schedule finished at step {self.step}"))
                    break
                for group, rate in zip(plan.optimizer.param_groups, rates):
                    group["lr"] = rate
                if plan.fused is not None:  # the optimizer steps during backward
                    self.last_good.keep(self.step)
                    crash_points.reached("step")
                total_loss, clipped, last_texts = self._accumulate()
                if not self._guard(total_loss):
                    continue  # a skipped step
                self._optimizer_step(clipped)
                self._report(total_loss, rates, began, self._validate())
                self._periodic(last_texts)
        path = self._save_or_stop("final")
        ended = "interrupted" if stopped or ctx.should_stop() else "finished"
        note = plan.final_note(path) if plan.final_note is not None and self.main else ""
        ctx.emit(ev.Finished(step=self.step, path=str(path),
                             message=f"Training {ended} at step {self.step}; saved {path}"
                                     + (f". {note}" if note else "")))
        return path

    # ------------------------------------------------------------------ before the first step
    def _resume_optimizer(self) -> None:
        plan, ctx, start = self.plan, self.ctx, self.start
        if self.main:
            recovered = recover_pair(plan.final_path)
            if recovered:
                ctx.emit(ev.Status(f"{plan.final_path.name}: {recovered}"))
        state, reason = (load_optim(plan.final_path, plan.checksum()) if plan.resume_optimizer
                         else (None, "starting over"))
        sidecar_step = ((state or {}).get("danlu") or {}).get("step")
        self.saved_loss_scale = None
        if state is not None and sidecar_step is not None and sidecar_step != start:
            state, reason = None, (f"{plan.final_path.name}.optim is of step {sidecar_step}, the "
                                   f"file of step {start}")
        if state is None:
            if start:
                ctx.emit(ev.Status(f"Continuing at step {start} with a fresh optimizer ({reason})"))
            return
        try:
            plan.optimizer.load_state_dict(state["optimizer_state_dict"])
            _check_state_shapes(plan.optimizer, (state.get("danlu") or {}).get("param_shapes"))
        except (ValueError, KeyError, RuntimeError) as error:
            raise TrainingError(f"resume: the saved optimizer state in {plan.final_path.name}.optim "
                                f"does not fit this network ({error}); delete the .optim file "
                                "to continue with a fresh optimizer") from None
        ctx.emit(ev.Status(f"Resuming at step {start} with the saved optimizer state"))
        self.saved_loss_scale = (state.get("danlu") or {}).get("loss_scale")
        saved_threads = (state.get("danlu") or {}).get("threads")
        if saved_threads not in (None, torch.get_num_threads()) and self.unet.device.type == "cpu":
            # torch's CPU reductions split their sums by thread (trainers/reproducible_blas.py)
            ctx.emit(ev.Status(f"Saved with {saved_threads} CPU threads, resumed with "
                               f"{torch.get_num_threads()}: the steps repeat an uninterrupted "
                               "run up to rounding, not bit for bit"))

    def _open_run_folder(self) -> None:
        opts, ctx, start = self.opts, self.ctx, self.start
        if self.main:
            self.folder = RunFolder.create(ctx.paths.resolve(opts.log_directory, "log_directory"),
                                           self.plan.name, opts.csv_name)
            self.folder.write_settings(start, {**opts.settings, "start_step": start,
                                               "processes": distributed.processes(ctx)})
            if opts.log_with == "tensorboard":
                from trainers.tensorboard_log import TensorBoardLog
                self.tensorboard = TensorBoardLog(self.folder.root, opts.settings, start)
        if start >= opts.steps or self.plan.rates(start) is None:
            raise TrainingError(f"steps: the file is already at step {start}, and training ends "
                                f"at step {opts.steps} or where the learning-rate schedule ends; "
                                "raise max steps or extend the schedule to train further")

    @contextlib.contextmanager
    def _offloaded(self):
        """The plan's frozen parts off the device during the steps; with text outputs cached,
        the captions of one epoch from here are encoded first (as the steps would encode them),
        so the text encoders can leave too."""
        offload = self.plan.offload
        if offload is None:
            yield
            return
        if offload.text_cached:
            first = self.step * self.opts.accumulation
            for micro in range(first, first + self.per_epoch):
                with self.autocast, torch.no_grad():
                    self.plan.encode(self._texts(micro))
            for batch in self.opts.validation.batches if self.opts.validation else []:
                with self.autocast, torch.no_grad():
                    self.plan.encode(batch.texts)
        with offload.parked():
            yield

    def _texts(self, micro: int) -> list[str]:
        texts = self.data.batch(micro).texts
        if self.parallel is not None:
            texts = texts[self.parallel.shard(len(texts)).rows]
        return texts

    # ------------------------------------------------------------------ one step
    def _micro_loss(self, micro: int) -> tuple[torch.Tensor, list[str]]:
        """One micro-batch's loss (this process's rows of it when data-parallel)."""
        plan, opts = self.plan, self.opts
        batch = self.data.batch(micro)
        shard = self.parallel.shard(len(batch.texts)) if self.parallel is not None else None
        if shard is not None:
            batch = distributed.take(batch, shard.rows)
        with self.autocast:
            context, added = unet_inputs(plan.encode(batch.texts), batch.latents, batch.sizes,
                                         getattr(self.model, "vae_scale", 8))
            loss = diffusion_loss(self.unet, self.objective, batch.latents, context,
                                  seeds.generator(opts.seed, "noise", micro),
                                  weight=batch.weights, min_snr_gamma=opts.min_snr_gamma,
                                  noise_offset=opts.noise_offset, added_cond=added,
                                  device=self.device, dtype=self.dtype,
                                  rows=shard.rows if shard else None,
                                  batch_size=shard.size if shard else None,
                                  x0_loss=plan.x0_loss(batch) if plan.x0_loss else None,
                                  predict=self.predict)
        return (loss * shard.scale if shard else loss), batch.texts

    def _accumulate(self) -> tuple[float, bool, list[str]]:
        """Every micro-batch's backward; (the step's loss, whether the gradients were clipped
        already, the last captions)."""
        opts, parallel, scaler, fused = self.opts, self.parallel, self.scaler, self.plan.fused
        if fused is not None:
            fused.begin()
        summed, texts = None, []  # the step's loss stays on the device until all micro-batches ran
        for k in range(opts.accumulation):
            micro = self.step * opts.accumulation + k
            local = (parallel.no_sync(self.step_loss) if parallel is not None
                     and k < opts.accumulation - 1 else contextlib.nullcontext())
            with local:  # gradients are averaged across processes at the last micro-step
                loss, texts = self.step_loss(micro)
                scaled = loss / opts.accumulation
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            summed = scaled.detach() if summed is None else summed + scaled.detach()
        # one host sync per optimizer step, shared by the non-finite guard and the log line;
        # with fp16 loss scaling overflowing gradients are normal: the scaler skips those
        gauge, clipped = (grad_check.gauge(self.parameters, opts.clip_mode,
                                           opts.clip_value(self.step))
                          if scaler is None and fused is None else (None, False))
        if fused is not None:  # the gradients are gone; their norm was kept on the way
            gauge = fused.gauge()
        total_loss, self.grad_gauge = grad_check.read(summed, gauge)
        if parallel is not None:
            total_loss = parallel.mean(total_loss)  # the whole batch's loss, on every process
        return total_loss, clipped, texts

    def _guard(self, total_loss: float) -> bool:
        """False when the step is skipped (nan/inf in "skip" mode); raises when the run stops
        for a nan/inf, after keeping the last good state."""
        opts = self.opts
        # the same on every process: DDP averaged the gradients
        bad = grad_check.verdict(total_loss, self.grad_gauge)
        if bad is None:
            self.skipped = 0
            return True
        self.plan.optimizer.zero_grad(set_to_none=True)
        self.skipped = self.skipped + 1 if opts.on_nan == "skip" else MAX_SKIPPED_IN_A_ROW
        if self.skipped < MAX_SKIPPED_IN_A_ROW:
            self.step += 1  # the weights stay as they were; the next step has new data
            self.ctx.emit(ev.Status(f"Skipped step {self.step}: {bad}; the weights were not "
                                    "changed"))
            return False
        at = self.step + 1
        # fused: the weights already took the bad step; those before it gave the finite loss
        kept = self._keep_last_good(math.isfinite(total_loss) and self.plan.fused is None)
        if self.parallel is not None:
            self.parallel.wait()  # the others end only after the main process saved
        several = f" in {self.skipped} steps in a row" if opts.on_nan == "skip" else ""
        raise TrainingError(f"{bad} at step {at}{several}; {kept}. Try a lower learning rate.")

    def _optimizer_step(self, clipped: bool) -> None:
        plan, opts, scaler = self.plan, self.opts, self.scaler
        if plan.fused is not None:
            self._stepped()
            return
        if opts.clip_mode != "disabled" and not clipped:
            if scaler is not None:
                scaler.unscale_(plan.optimizer)
            _clip(self.parameters, opts.clip_mode, opts.clip_value(self.step))
        self.last_good.keep(self.step)
        crash_points.reached("step")
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(plan.optimizer)  # skips the step when gradients overflowed
            scaler.update()
            if scaler.get_scale() < scale:
                self.ctx.emit(ev.Status(
                    f"Step {self.step + 1}: the fp16 gradients overflowed at loss scale "
                    f"{scale:g}; the scaler skipped this update (the weights were not changed) "
                    f"and lowered the scale to {scaler.get_scale():g}"))
        else:
            plan.optimizer.step()
        plan.optimizer.zero_grad(set_to_none=True)
        self._stepped()

    def _stepped(self) -> None:
        plan = self.plan
        self.step += 1
        self.stepped = True
        if plan.after_step is not None:
            plan.after_step(self.step)

    def _validate(self) -> float | None:
        """The held-out loss every N steps (main process; trainers/validation.py)."""
        validation = self.opts.validation
        if (validation is None or not self.main or not validation.every
                or self.step % validation.every):
            return None
        from trainers.validation import validation_loss
        return validation_loss(self.model, self.unet, self.objective, validation,
                               self.plan.encode, predict=self.predict, device=self.device,
                               dtype=self.dtype, autocast=self.autocast,
                               min_snr_gamma=self.opts.min_snr_gamma,
                               noise_offset=self.opts.noise_offset)

    def _report(self, total_loss: float, rates: list[float], began: float,
                validation: float | None = None) -> None:
        opts, step, rate = self.opts, self.step, rates[0]
        epoch, within = divmod(step * opts.accumulation, self.per_epoch)
        epoch_step = within // opts.accumulation
        if self.folder is not None:
            self.folder.log_loss(step, epoch, epoch_step, total_loss, rate)
            if validation is not None:
                self.folder.log_validation(step, validation)
        if self.tensorboard is not None:
            self.tensorboard.step(step, total_loss, rates, validation)
        self.ctx.emit(ev.Progress(step=step, total=opts.steps, loss=total_loss, learn_rate=rate,
                                  epoch=epoch, epoch_step=epoch_step, start_step=self.start,
                                  elapsed=time.perf_counter() - began,
                                  validation_loss=validation))

    def _periodic(self, last_texts: list[str]) -> None:
        """The numbered copy and the preview every N steps (main process only)."""
        plan, opts, step = self.plan, self.opts, self.step
        if not self.main:
            return
        if opts.save_every and step % opts.save_every == 0 and step < opts.steps:
            copies = self.folder.sub(plan.copies_folder)
            copy = copies / f"{plan.name}-{step}{plan.final_path.suffix}"
            try:
                plan.save(copy, step)
                self._save("checkpoint")
            except SaveRefusedError as error:
                self._stop_for_refused_save(error)
            self.ctx.emit(ev.Saved(step=step, path=str(copy), kind="copy"))
            if opts.keep_last:
                _prune(copies, plan, opts.keep_last)
        if opts.preview_every and step % opts.preview_every == 0:
            self._preview(step, last_texts)

    def _preview(self, step: int, texts: list[str]) -> None:
        written = preview(self.model, self.plan, self.unet, self.folder, step, texts, self.ctx)
        if self.tensorboard is not None:
            self.tensorboard.previews(step, written)

    def _stopping(self) -> bool:  # every process stops at the same step
        asked = self.ctx.should_stop()
        return self.parallel.any(asked) if self.parallel is not None else asked

    # ------------------------------------------------------------------ saving
    def _save(self, kind: str) -> Path:
        """The file and its .optim sidecar, both or neither (SaveRefusedError: neither)."""
        plan, opts, step = self.plan, self.opts, self.step
        if not self.main:
            return plan.final_path
        with saving_pair(plan.final_path):
            plan.save(plan.final_path, step)
            crash_points.reached("save:between-file-and-sidecar")
            extra = {"seed": opts.seed, "step": step, "threads": torch.get_num_threads(),
                     "param_shapes": _param_shapes(plan.optimizer)}
            if plan.sidecar_extra is not None:
                extra.update(plan.sidecar_extra())
            if opts.keep_loss_scale and self.scaler is not None:
                extra["loss_scale"] = self.scaler.state_dict()
            save_optim(plan.final_path, plan.checksum(), opts.optimizer_name,
                       plan.optimizer.state_dict(), extra=extra)
        self.saved_step = step
        self.folder.flush()
        self.ctx.emit(ev.Saved(step=step, path=str(plan.final_path), kind=kind))
        return plan.final_path

    def _save_or_stop(self, kind: str) -> Path:
        try:
            return self._save(kind)
        except SaveRefusedError as error:
            self._stop_for_refused_save(error)

    def _keep_last_good(self, current_gave_finite_loss: bool) -> str:
        """After a nan/inf: save the newest state known to give a finite loss whose save is not
        refused (the current weights, else those before the last step); says what the file
        holds. Weights that gave a nan/inf loss are not saved."""
        refused = []
        if current_gave_finite_loss and self.stepped and self.step != self.saved_step:
            try:
                self._save("last good state")
            except SaveRefusedError as error:
                refused.append(error.reason)
        if self.saved_step != self.step or not current_gave_finite_loss:
            back = self.last_good.restore()
            if back is not None and back != self.saved_step and (
                    back > self.start or self.saved_step is not None):
                self.step = back
                try:
                    self._save("last good state")
                except SaveRefusedError as error:
                    refused.append(error.reason)
        held = (f"the file keeps the state of step {self.saved_step}"
                if self.saved_step is not None
                else f"nothing was saved ({self.plan.final_path.name} does not exist)")
        return held + "".join(f" (step {self.step} was not saved either: {why})"
                              for why in refused[-1:])

    def _stop_for_refused_save(self, error: SaveRefusedError):
        at = self.step
        kept = self._keep_last_good(False)
        raise TrainingError(f"the weights of step {at} cannot be saved ({error.reason}); "
                            f"{kept}. Try a lower learning rate.")


def _prune(folder: Path, plan: TrainingPlan, keep: int) -> None:
    """Delete all but the newest `keep` periodic copies of this run: exactly `<name>-<step>`,
    never another run's `<name>-<more>-<step>` (or APT's `<name>-neg-<step>`) in the folder."""
    pattern = re.compile(re.escape(plan.name) + r"-(\d+)" + re.escape(plan.final_path.suffix))
    steps = {p: int(m.group(1)) for p in folder.glob(f"{plan.name}-*{plan.final_path.suffix}")
             if (m := pattern.fullmatch(p.name))}
    for old in sorted(steps, key=steps.get)[:-keep]:
        old.unlink(missing_ok=True)


def preview(model, plan: TrainingPlan, unet, run: RunFolder, step: int, texts: list[str],
            ctx) -> list[Path]:
    """Render the plan's previews of `step`; returns the PNGs written."""
    written = []
    visiting = plan.offload.visiting if plan.offload is not None else contextlib.nullcontext
    for index, settings in enumerate(plan.previews(step, texts)):
        with plan.preview_context(), visiting():
            image, seed = render(model, plan.prompt_encoder, settings, unet=unet)
        crash_points.reached("preview")
        suffix = f"-{index}" if index else ""
        path = run.sub("images") / f"{plan.name}-{step}{suffix}.png"
        atomic_write(path, lambda temp: image.save(temp, format="PNG"))
        written.append(path)
        if plan.on_preview is not None and index == 0:
            plan.on_preview(image, step, run)
        ctx.emit(ev.Preview(step=step, path=str(path),
                            caption=f"step {step}, seed {seed}: {settings.prompt}"))
    return written
