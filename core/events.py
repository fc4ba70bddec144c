"""Events a job emits to whoever watches it (the page, the console, a log)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Status:
    text: str


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    loss: float
    learn_rate: float
    epoch: int = 0
    epoch_step: int = 0
    start_step: int = 0  # the step this run (or resumed run) began at
    elapsed: float = 0.0  # seconds since that step, for it/s and ETA


@dataclass(frozen=True)
class Preview:
    step: int
    path: str
    caption: str = ""


@dataclass(frozen=True)
class Saved:
    step: int
    path: str
    kind: str = "checkpoint"


@dataclass(frozen=True)
class Finished:
    step: int
    path: str = ""
    message: str = ""


@dataclass(frozen=True)
class Failed:
    message: str
    details: str = ""


Event = Status | Progress | Preview | Saved | Finished | Failed
