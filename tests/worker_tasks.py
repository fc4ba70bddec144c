"""Targets for tests/test_worker_process.py, run inside the training worker process (each is
called as function(ctx, *args) with JSON arguments)."""
from __future__ import annotations

import os
import time

from core import events as ev


def report(ctx, steps: int, preview: str) -> None:
    """Say which process runs it, a few progress events and a preview."""
    ctx.emit(ev.Status(f"pid {os.getpid()}"))
    for step in range(1, steps + 1):
        ctx.emit(ev.Progress(step=step, total=steps, loss=1.0 / step, learn_rate=0.1))
    ctx.emit(ev.Preview(step=steps, path=preview, caption="a preview"))
    ctx.emit(ev.Finished(step=steps, message=f"done in {ctx.paths.data_dir.name}, "
                                            f"confined: {ctx.paths.confine}"))


def until_stopped(ctx, marker: str) -> None:
    """Step until asked to stop, then 'save' (write the marker) and finish as the loop does."""
    step = 0
    while not ctx.should_stop():
        step += 1
        ctx.emit(ev.Progress(step=step, total=10**9, loss=1.0, learn_rate=0.1))
        time.sleep(0.02)
    time.sleep(0.3)  # saving takes a moment
    with open(marker, "w") as handle:
        handle.write(str(step))
    ctx.emit(ev.Finished(step=step, message=f"Training interrupted at step {step}"))


class _Refused(ValueError):
    def __init__(self, message):
        super().__init__(message)
        self.user_message = message


def refuse(ctx, message: str) -> None:
    raise _Refused(message)


def timed_load(ctx, model: str) -> None:
    """Load the base model as a training run does; say which object it got and how long it took."""
    from trainers.models import load_model
    started = time.perf_counter()
    loaded = load_model(ctx.paths, model)
    ctx.emit(ev.Status(f"model {id(loaded)} in {time.perf_counter() - started:.3f} s"))


def with_failing_step(ctx, kind: str, call: int, method: str, config: dict) -> None:
    """A real training job whose `call`-th diffusion loss is NaN or raises out-of-memory (as
    tests/test_reliability_training.py does in-thread), undone afterwards: the worker lives on."""
    import torch

    import trainers.loop
    from trainers.registry import run_config
    real = trainers.loop.diffusion_loss
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if kind == "nan":
                return real(*args, **kwargs) * float("nan")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)
    trainers.loop.diffusion_loss = patched
    try:
        run_config(ctx, method, config)
    finally:
        trainers.loop.diffusion_loss = real


def report_threads(ctx) -> None:
    import torch
    ctx.emit(ev.Status(f"torch threads {torch.get_num_threads()}"))
