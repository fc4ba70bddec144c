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
    validation_loss: float | None = None  # the held-out loss, at steps that validate


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


EVENT_TYPES = {cls.__name__: cls for cls in (Status, Progress, Preview, Saved, Finished, Failed)}


def to_json(event: Event) -> str:
    """One line of JSON: {"event": "Progress", "step": 3, ...} (what --json-events prints)."""
    import json
    from dataclasses import asdict
    return json.dumps({"event": type(event).__name__, **asdict(event)})


def from_json(line: str) -> Event | None:
    """The event a to_json line describes; None for any other line."""
    import json
    from dataclasses import fields
    try:
        data = json.loads(line)
    except ValueError:
        return None
    cls = EVENT_TYPES.get(data.get("event")) if isinstance(data, dict) else None
    if cls is None:
        return None
    known = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError:  # a required field is missing
        return None
