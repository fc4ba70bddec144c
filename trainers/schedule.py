"""A1111's learning-rate schedule strings: "0.005:100, 1e-3:1000, 1e-5".

Each `rate:step` pair holds until (not including) that step; a bare last rate, or a step of -1,
runs to max steps. When the schedule is exhausted, training stops."""
from __future__ import annotations

import math
from dataclasses import dataclass


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class Schedule:
    pieces: tuple[tuple[float, int], ...]  # (rate, end step, exclusive)

    def rate(self, step: int) -> float | None:
        """The rate for 0-based `step`, or None when the schedule has run out."""
        for value, end in self.pieces:
            if step < end:
                return value
        return None

    @property
    def end(self) -> int:
        return self.pieces[-1][1]


def parse_schedule(text: str, max_steps: int, field: str = "learn_rate",
                   allow_zero: bool = False) -> Schedule:
    text = str(text).strip()
    if not text:
        raise ScheduleError(f"{field}: empty; give a rate such as 0.005 or a schedule such as "
                            "'0.005:100, 1e-3:1000, 1e-5'")
    pieces: list[tuple[float, int]] = []
    parts = [p.strip() for p in text.split(",")]
    for index, part in enumerate(parts):
        if not part:
            raise ScheduleError(f"{field}: empty entry at position {index + 1} in {text!r}")
        rate_text, colon, step_text = part.partition(":")
        try:
            rate = float(rate_text)
        except ValueError:
            raise ScheduleError(f"{field}: {rate_text.strip()!r} is not a number (in {part!r})") from None
        if not math.isfinite(rate) or rate < 0 or (rate == 0 and not allow_zero):
            raise ScheduleError(f"{field}: the rate must be a positive number, got {rate_text.strip()!r}")
        if step_text.strip() == "":
            if colon:  # "0.1:" is a typo, not a bare rate
                raise ScheduleError(f"{field}: missing step after ':' in {part!r}")
            if index != len(parts) - 1:
                raise ScheduleError(f"{field}: only the last entry may omit its step ({part!r})")
            end = max_steps
        else:
            try:
                end = int(step_text)
            except ValueError:
                raise ScheduleError(f"{field}: step {step_text.strip()!r} is not a whole number "
                                    f"(in {part!r})") from None
            if end == -1:
                end = max_steps
            elif end <= 0:
                raise ScheduleError(f"{field}: step must be positive or -1, got {end} (in {part!r})")
        if pieces and end <= pieces[-1][1]:
            raise ScheduleError(f"{field}: steps must increase, but {end} follows {pieces[-1][1]}")
        pieces.append((rate, min(end, max_steps)))
    return Schedule(tuple(pieces))
