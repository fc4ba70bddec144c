"""Turn a job snapshot into what the page shows: a status line, a loss plot, preview paths."""
from __future__ import annotations

import time

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
