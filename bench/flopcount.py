"""Measure-in-the-child helpers shared by Danlu's runner and the diffusers-script wrapper.

Self-contained (stdlib + torch only): `bench/script_timer.py` imports it by file location
inside the diffusers scripts' process, where the repo is not on sys.path.

- `StepRecorder`: wall-clock timestamps of step ends (and of other events between steps),
  peak RSS at the last step, FLOPs of one chosen step counted with
  torch.utils.flop_counter.FlopCounterMode (entered at the end of step k-1 and left at the end of
  step k, so it sees exactly one step whatever code runs it).
- `cpu_sdpa_mapping()`: torch's FLOP counter knows the CUDA attention kernels but not the CPU
  one (`_scaled_dot_product_flash_attention_for_cpu` and its backward); without this the
  attention matmuls would be missing from the count.
"""
from __future__ import annotations

import resource
import time


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_sdpa_mapping() -> dict:
    import torch
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {}
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return mapping


class StepRecorder:
    """Call `step_done(step)` at the end of every optimizer step and `other(kind)` for work
    between steps (previews, saves) that must not count as the next step's time."""

    def __init__(self, flop_step: int | None = 2, rss_at_step: int | None = None):
        self.step_ends: list[tuple[int, float]] = []  # (step, perf_counter)
        self.boundaries: list[float] = []  # perf_counter at which the next step's clock starts
        # the same in CPU seconds of this process (all threads): contention inflates wall time
        # much more than CPU time, so it is the steadier measure on a shared machine
        self.cpu_ends: list[float] = []
        self.cpu_boundaries: list[float] = []
        self.step_walls: list[tuple[int, float]] = []  # (step, time.time()) for paired runs
        self.others: list[tuple[str, float, float]] = []  # (kind, started, ended)
        self.flop_step = flop_step
        self.flops: int | None = None
        self.flops_by_module: dict[str, int] = {}
        self.rss_at_step = rss_at_step
        self.rss_at_last_step: float | None = None
        self._counter = None
        self.started = time.perf_counter()

    def begin(self) -> None:
        """Mark when the first step's clock starts (the training loop begins)."""
        self.boundaries = [time.perf_counter()]
        self.cpu_boundaries = [time.process_time()]

    def step_done(self, step: int) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.step_ends.append((step, now))
        self.boundaries.append(now)
        self.cpu_ends.append(cpu)
        self.cpu_boundaries.append(cpu)
        self.step_walls.append((step, time.time()))
        self.rss_at_last_step = peak_rss_mib()
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)
            self.flops = int(counter.get_total_flops())
            self.flops_by_module = {name: int(sum(ops.values()))
                                    for name, ops in counter.get_flop_counts().items()}
            self.boundaries[-1] = time.perf_counter()  # the exit is not the next step's time
            self.cpu_boundaries[-1] = time.process_time()
        if self.flop_step is not None and step == self.flop_step - 1:
            from torch.utils.flop_counter import FlopCounterMode
            self._counter = FlopCounterMode(display=False, depth=2, custom_mapping=cpu_sdpa_mapping())
            self._counter.__enter__()
            self.boundaries[-1] = time.perf_counter()
            self.cpu_boundaries[-1] = time.process_time()

    def other(self, kind: str, started: float, ended: float | None = None) -> None:
        ended = time.perf_counter() if ended is None else ended
        self.others.append((kind, started, ended))
        if self.boundaries:
            self.boundaries[-1] = max(self.boundaries[-1], ended)
            self.cpu_boundaries[-1] = time.process_time()

    def close(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def step_times(self) -> list[tuple[int, float]]:
        """(step, seconds) of each step: from the previous step's end (or the loop start, or the
        end of whatever ran in between) to this step's end."""
        times = []
        for index, (step, end) in enumerate(self.step_ends):
            start = self.boundaries[index] if index < len(self.boundaries) else None
            if start is not None:
                times.append((step, end - start))
        return times

    def step_cpu_times(self) -> list[tuple[int, float]]:
        return [(step, end - start) for (step, _), end, start
                in zip(self.step_ends, self.cpu_ends, self.cpu_boundaries)]

    def summary(self) -> dict:
        top = {name: flops for name, flops in self.flops_by_module.items() if name.count(".") <= 1}
        return {"step_times": self.step_times(), "step_cpu_times": self.step_cpu_times(),
                "flops": self.flops,
                "flops_by_module": top, "flop_step": self.flop_step, "step_walls": self.step_walls,
                "rss_at_last_step_mib": self.rss_at_last_step,
                "others": [(kind, end - start) for kind, start, end in self.others]}
