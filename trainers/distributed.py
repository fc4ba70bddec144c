"""Data-parallel training across the processes of `accelerate launch` (one per GPU).

Every process runs the same loop on the same global batches: batch m is drawn by its
counter-based seed (trainers/seeds.py) as a one-process run with the whole batch would draw it,
and each process trains its own rows of it (its shard), noise and timesteps included.
accelerate wraps the trainable parameters in torch's DistributedDataParallel, which averages
the gradients across processes during backward; every optimizer then takes the same step.
Only the main process writes files and reports progress.

A one-process run has no DataParallel at all (`of(ctx)` is None) and does none of this."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch


@dataclass(frozen=True)
class Shard:
    rows: slice  # the rows of the global batch this process trains
    size: int  # rows in the global batch
    scale: float  # times this process's mean loss, so the mean over processes is the batch mean


def shard_of(size: int, processes: int, index: int) -> Shard:
    """Split `size` rows as evenly as possible, in order. With fewer rows than processes, a
    process without a row trains row 0 with weight 0, so that every process still runs the
    same forward and backward (DDP's gradient averaging needs all of them)."""
    base, extra = divmod(size, processes)
    start = index * base + min(index, extra)
    count = base + (1 if index < extra else 0)
    if count == 0:
        return Shard(slice(0, 1), size, 0.0)
    return Shard(slice(start, start + count), size, count * processes / size)


def take(batch, rows: slice):
    """The rows of a loop Batch."""
    return replace(batch, latents=batch.latents[rows], texts=batch.texts[rows],
                   weights=None if batch.weights is None else batch.weights[rows],
                   sizes=None if batch.sizes is None else batch.sizes[rows],
                   pixels=None if batch.pixels is None else batch.pixels[rows])


def launched_processes() -> int:
    """How many processes `accelerate launch` (torchrun) started, from its environment."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class _Trainable(torch.nn.Module):
    """Holds the trainable parameters (wherever they live: LoRA layers, an embedding's
    vectors, hypernetwork modules, the U-Net) so DDP sees them; forward is one micro-step."""

    def __init__(self, parameters: list[torch.nn.Parameter], compute: Callable):
        super().__init__()
        self.trainable = torch.nn.ParameterList(parameters)
        self.compute = compute

    def forward(self, *args):
        return self.compute(*args)


class DataParallel:
    """The processes of one `accelerate launch` run, seen from one of them."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    @classmethod
    def from_environment(cls) -> "DataParallel | None":
        """A DataParallel when started by `accelerate launch` with several processes, else None."""
        if launched_processes() < 2:
            return None
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        # unused trainable parameters are normal here (clip skip leaves the text encoder's last
        # layer out; a hypernetwork may have modules for widths the model lacks); precision is
        # the run's own setting, applied by the loop
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                                  kwargs_handlers=[DistributedDataParallelKwargs(
                                      find_unused_parameters=True)])
        return cls(accelerator)

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def shard(self, size: int) -> Shard:
        return shard_of(size, self.processes, self.index)

    def wrap(self, parameters: list[torch.nn.Parameter], compute: Callable) -> torch.nn.Module:
        """`compute` as a DDP module whose backward averages the parameters' gradients."""
        return self.accelerator.prepare_model(_Trainable(parameters, compute),
                                              device_placement=False)

    def no_sync(self, module):
        """Accumulate gradients locally (all micro-steps of a step but the last)."""
        return self.accelerator.no_sync(module)

    def mean(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean").item())

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on one (so all stop at the same step)."""
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(tensor, reduction="sum").item() > 0)

    def main_first(self):
        """The main process runs the block first (building caches, class images), then the rest."""
        return self.accelerator.main_process_first()

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        self.wait()
        self.accelerator.end_training()


def of(ctx) -> DataParallel | None:
    return getattr(ctx, "parallel", None)


def is_main(ctx) -> bool:
    parallel = of(ctx)
    return parallel is None or parallel.is_main


def processes(ctx) -> int:
    parallel = of(ctx)
    return 1 if parallel is None else parallel.processes


def main_first(ctx):
    parallel = of(ctx)
    return contextlib.nullcontext() if parallel is None else parallel.main_first()
