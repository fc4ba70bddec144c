"""TensorBoard logging (kohya's `log_with = "tensorboard"`), optional: the tensorboard package is
imported only when a run asks for it, and a config asking without it installed is refused
(trainers/configs.py). Events go to <run folder>/tensorboard/; open them with
`tensorboard --logdir <log directory>`.

Tags follow kohya's: loss/current, loss/average (the mean of the last 100 steps), lr/<group>,
loss/validation; previews as images under preview/<n>; the settings as text."""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np

FOLDER = "tensorboard"


class TensorBoardLog:
    def __init__(self, run_root: Path, settings: dict, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run_root / FOLDER))
        self.recent: deque[float] = deque(maxlen=100)
        text = json.dumps(settings, indent=2, default=str)
        # TensorBoard renders text as markdown: indent it as a code block
        self.writer.add_text("settings", "\n".join("    " + line for line in text.splitlines()),
                             start_step)

    def step(self, step: int, loss: float, rates: list[float],
             validation: float | None = None) -> None:
        self.recent.append(loss)
        self.writer.add_scalar("loss/current", loss, step)
        self.writer.add_scalar("loss/average", sum(self.recent) / len(self.recent), step)
        for index, rate in enumerate(rates):
            self.writer.add_scalar(f"lr/group{index}", rate, step)
        if validation is not None:
            self.writer.add_scalar("loss/validation", validation, step)

    def previews(self, step: int, paths: list[Path]) -> None:
        from PIL import Image
        for index, path in enumerate(paths):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"preview/{index}", pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
