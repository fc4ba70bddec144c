"""A run's log folder, <log>/<date>/<name>/, with its loss CSV and settings."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import atomic_write_text

LOSS_COLUMNS = ["step", "epoch", "epoch_step", "loss", "learn_rate"]
VALIDATION_CSV = "validation.csv"  # step, loss: the held-out loss (trainers/validation.py)


@dataclass
class RunFolder:
    root: Path
    csv_name: str = "loss.csv"
    _pending: list = field(default_factory=list)

    @classmethod
    def create(cls, log_directory: Path, name: str, csv_name: str) -> "RunFolder":
        root = log_directory / time.strftime("%Y-%m-%d") / name
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, csv_name)

    def sub(self, name: str) -> Path:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def write_settings(self, start_step: int, settings: dict) -> Path:
        path = self.root / f"settings-{start_step}.json"
        atomic_write_text(path, json.dumps(settings, indent=2, default=str))
        return path

    def log_loss(self, step: int, epoch: int, epoch_step: int, loss: float, learn_rate: float):
        self._pending.append([step, epoch, epoch_step, f"{loss:.7f}", f"{learn_rate:.8g}"])
        if len(self._pending) >= 50:
            self.flush()

    def log_validation(self, step: int, loss: float) -> None:
        """Written at once: one row every N steps."""
        path = self.root / VALIDATION_CSV
        _drop_cut_line(path)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "loss"])
            writer.writerow([step, f"{loss:.7f}"])

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.root / self.csv_name
        _drop_cut_line(path)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(LOSS_COLUMNS)
            writer.writerows(self._pending)
        self._pending.clear()


def _drop_cut_line(path: Path) -> None:
    """A run killed while appending leaves a line without its end; the next run's rows would
    join it. Cut it off (the step is logged again by the run that repeats it)."""
    if not path.exists():
        return
    with open(path, "r+b") as handle:
        size = handle.seek(0, 2)
        if size == 0:
            return
        handle.seek(max(0, size - 4096))
        tail = handle.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        handle.truncate(size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
