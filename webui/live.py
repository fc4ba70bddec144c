"""Turn a job snapshot into what the page shows: a status line, a loss plot, preview paths.

A page keeps a `Watch` in its session state: each poll asks the job only for the loss points
the page has not seen (`LossSeries` thins and smooths them as they arrive), so a poll costs the
same at step 100 and at step 100,000. A fresh page (a reload, a second browser) starts with an
empty Watch and gets the whole history once."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import pandas as pd

from core import events as ev


def smoothed(values: list[float], window: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_frame(losses: list[tuple[int, float, float]], limit: int = 2000) -> pd.DataFrame | None:
    """Loss and its moving average for a LinePlot; None while there is nothing (Gradio 6 never
    draws a LinePlot that once received an empty frame)."""
    if not losses:
        return None
    every = max(1, len(losses) // limit)
    steps = [s for s, _, _ in losses]
    values = [l for _, l, _ in losses]
    smooth = smoothed(values)
    rows = {"step": steps[::every] * 2, "loss": values[::every] + smooth[::every],
            "series": ["loss"] * len(steps[::every]) + ["smoothed"] * len(steps[::every])}
    return pd.DataFrame(rows)


VALIDATION_COLOR = "#756bb1"  # the held-out loss in both loss plots


def with_validation(frame: pd.DataFrame | None, validation) -> pd.DataFrame | None:
    """The loss frame plus the held-out loss as its own series ("validation")."""
    if frame is None or not validation:
        return frame
    points = pd.DataFrame([(step, loss, "validation") for step, loss, *_ in validation],
                          columns=["step", "loss", "series"])
    return pd.concat([frame, points], ignore_index=True)


class LossSeries:
    """One job's loss curve as the page plots it, fed only new points: at most `limit` points
    (every `stride`-th; the stride doubles when the limit is passed) and the `window`-step moving
    average of all points, as `smoothed` computes it."""

    def __init__(self, job_id: int | None = None, limit: int = 400, window: int = 20):
        self.job_id, self.limit, self.window = job_id, limit, window
        self.count = 0  # points seen: the index to ask the job for next
        self.stride = 1
        self.steps: list[int] = []
        self.values: list[float] = []
        self.smooth: list[float] = []
        self._recent: deque[float] = deque()
        self._total = 0.0
        self.validation: list[tuple[int, float]] = []  # (step, held-out loss), every point

    def extend(self, rows) -> None:
        for step, loss, *_ in rows:
            self._recent.append(loss)
            self._total += loss
            if len(self._recent) > self.window:
                self._total -= self._recent.popleft()
            if self.count % self.stride == 0:
                self.steps.append(step)
                self.values.append(loss)
                self.smooth.append(self._total / len(self._recent))
                if len(self.steps) > self.limit:
                    self.stride *= 2
                    self.steps, self.values = self.steps[::2], self.values[::2]
                    self.smooth = self.smooth[::2]
            self.count += 1

    def frame(self) -> pd.DataFrame | None:
        """The LinePlot's value (None while empty, see `loss_frame`)."""
        if not self.steps:
            return None
        n = len(self.steps)
        frame = pd.DataFrame({"step": self.steps * 2, "loss": self.values + self.smooth,
                              "series": ["loss"] * n + ["smoothed"] * n})
        return with_validation(frame, self.validation)


@dataclass
class Watch:
    """What one page has shown: (job id, loss points, previews, state, queued job ids) and the
    page's copy of the loss curve. Lives in the page's gr.State."""
    key: tuple = (None, -1, -1, None, ())
    series: LossSeries = field(default_factory=LossSeries)


def refresh(runner, watch: Watch) -> dict:
    """One poll of the latest training job: the parts that changed since `watch` (updated in
    place), as {"status": markdown, "plot": frame or None, "gallery": items, "queue": True};
    an absent key means unchanged. Copies only the new loss points."""
    job = runner.latest("train")
    if job is None:
        return {}
    waiting = tuple(j.id for j in runner.queued())
    if (job.id, *job.changes(), waiting) == watch.key:
        return {}
    # another job (or, after an app restart, another job with a reused id: fewer points)
    new_job = job.id != watch.key[0] or job.changes()[0] < watch.series.count
    if new_job or watch.series.job_id != job.id:
        watch.series = LossSeries(job.id, watch.series.limit, watch.series.window)
    snap = job.snapshot(losses_from=watch.series.count)
    key = (job.id, snap["loss_count"], len(snap["previews"]), snap["state"], waiting)
    out: dict = {"status": status_text(snap)}
    if snap["losses"] or new_job:
        watch.series.extend(snap["losses"])
        watch.series.validation = snap.get("validation", [])
        out["plot"] = watch.series.frame()
    if new_job or key[2] != watch.key[2]:
        out["gallery"] = gallery_items(snap["previews"])
    if waiting != watch.key[4]:
        out["queue"] = True
    watch.key = key
    return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"


def status_text(snap: dict | None) -> str:
    if snap is None:
        return "No job has run yet."
    lines = [f"**{snap['name']}** — {snap['state']}"]
    progress: ev.Progress | None = snap["progress"]
    if progress is not None:
        done = progress.step - progress.start_step
        rate = done / progress.elapsed if progress.elapsed > 0 else 0.0
        left = (progress.total - progress.step) / rate if rate > 0 else 0.0
        lines.append(f"step {progress.step}/{progress.total} · loss {progress.loss:.5f} · "
                     f"lr {progress.learn_rate:.3g} · {rate:.2f} it/s · "
                     f"ETA {_duration(left) if snap['state'] == 'running' else '—'} · "
                     f"epoch {progress.epoch}, {progress.epoch_step}")
    saved = [s for s in snap["saved"] if s.kind != "copy"]
    if saved:
        lines.append(f"last saved: `{saved[-1].path}` (step {saved[-1].step})")
    result = snap["result"]
    if isinstance(result, ev.Failed):
        lines.append(f"**Failed:** {result.message}")
    elif isinstance(result, ev.Finished):
        lines.append(result.message)
    elif snap["log"]:
        lines.append(snap["log"][-1])
    return "\n\n".join(lines)


def gallery_items(previews: list[ev.Preview], limit: int = 24) -> list[tuple[str, str]]:
    return [(p.path, p.caption) for p in previews[-limit:]][::-1]


def now() -> float:
    return time.time()
