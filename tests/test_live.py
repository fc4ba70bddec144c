"""The Train tab's live view: incremental polling (only new loss points), thinning, re-attach."""
from __future__ import annotations

import random

import pytest

from core import events as ev
from core.jobs import Job
from webui import live


def _rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [(step, rng.random(), 1e-4) for step in range(1, n + 1)]


def test_series_fed_in_pieces_equals_the_whole_history_frame():
    rows = _rows(350)
    series = live.LossSeries(limit=1000)
    for start in range(0, len(rows), 37):
        series.extend(rows[start:start + 37])
    assert series.count == 350
    whole = live.loss_frame(rows, limit=1000)
    assert series.frame().equals(whole)
    assert live.LossSeries().frame() is None  # empty: the LinePlot keeps None


def test_series_thins_to_its_limit_and_keeps_the_exact_moving_average():
    rows = _rows(5000, seed=1)
    series = live.LossSeries(limit=400)
    for start in range(0, len(rows), 123):
        series.extend(rows[start:start + 123])
    assert len(series.steps) <= 400 and series.stride == 16
    assert series.steps == [s for s, _, _ in rows[::16]]
    full = live.smoothed([loss for _, loss, _ in rows])
    assert series.smooth == pytest.approx(full[::16], rel=1e-9)
    frame = series.frame()
    assert len(frame) == 2 * len(series.steps) and set(frame["series"]) == {"loss", "smoothed"}


class _Runner:
    def __init__(self, job):
        self.job, self.asked = job, []
        real = job.snapshot

        def spy(losses_from: int = 0):
            self.asked.append(losses_from)
            return real(losses_from)
        job.snapshot = spy

    def latest(self, kind=None):
        return self.job

    def queued(self):
        return []


def _job(points: int) -> Job:
    job = Job(id=7, name="run", kind="train", fn=lambda ctx: None, state="running")
    for step, loss, rate in _rows(points):
        job.record(ev.Progress(step=step, total=1000, loss=loss, learn_rate=rate))
    return job


def test_refresh_sends_only_what_changed_and_asks_only_for_new_points():
    job = _job(50)
    runner = _Runner(job)
    page = live.Watch()
    first = live.refresh(runner, page)
    assert runner.asked == [0] and len(first["plot"]) == 100  # 50 points + 50 smoothed
    assert "step 50/1000" in first["status"] and first["gallery"] == []
    assert live.refresh(runner, page) == {}  # nothing new: nothing sent, nothing copied
    assert runner.asked == [0]

    job.record(ev.Progress(step=51, total=1000, loss=0.5, learn_rate=1e-4))
    second = live.refresh(runner, page)
    assert runner.asked == [0, 50]  # only the new point was copied
    assert len(second["plot"]) == 102 and "gallery" not in second
    job.record(ev.Preview(step=51, path="/tmp/p.png", caption="c"))
    third = live.refresh(runner, page)
    assert third["gallery"] == [("/tmp/p.png", "c")] and "plot" not in third


def test_a_reloaded_page_gets_the_whole_history_and_a_new_job_starts_a_new_series():
    job = _job(120)
    runner = _Runner(job)
    attached = live.Watch()
    live.refresh(runner, attached)
    job.record(ev.Progress(step=121, total=1000, loss=0.5, learn_rate=1e-4))
    live.refresh(runner, attached)

    reloaded = live.Watch()  # a reload or a second browser: a fresh session state
    again = live.refresh(runner, reloaded)
    assert runner.asked[-1] == 0
    assert again["plot"].equals(attached.series.frame())
    assert again["plot"].equals(live.loss_frame(job.losses, limit=10_000))

    other = _Runner(_job(3))
    other.job.id = 8
    switched = live.refresh(other, attached)
    assert other.asked == [0] and len(switched["plot"]) == 6
    assert attached.series.job_id == 8 and attached.series.count == 3


def test_a_job_with_fewer_points_under_the_same_id_starts_over():
    """After an app restart job ids start again at 1; a page must not skip the new job's points."""
    page = live.Watch()
    live.refresh(_Runner(_job(40)), page)
    restarted = _Runner(_job(5))  # same id 7, fewer points
    again = live.refresh(restarted, page)
    assert restarted.asked == [0] and len(again["plot"]) == 10 and page.series.count == 5
