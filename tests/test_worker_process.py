"""Training jobs run in a long-lived worker process (core/worker_process.py): another pid, events
and previews relayed into the JobRunner's job, interrupt and shutdown reach it and it saves, a
task's error comes back as the job's message, a killed worker fails its job with a message
naming what happened and the next job gets a fresh one, and the worker keeps the loaded model
between jobs. The real-training tests run textual inversion on the tiny model in the worker."""
from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from core import events as ev
from core.jobs import DONE, FAILED, STOPPED, JobRunner
from core.paths import Paths
from core.worker_process import ProcessTask


def wait_for(condition, timeout: float = 120, what: str = "condition"):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def pid_of(job) -> int:
    return int(next(line for line in job.log if line.startswith("pid ")).split()[1])


@pytest.fixture
def runner(tmp_path):
    runner = JobRunner(Paths(tmp_path, confine=True).ensure(), worker_process=True)
    yield runner
    runner.shutdown(timeout=30)


def test_a_task_runs_in_another_process_and_its_events_stream(runner, tmp_path):
    job = runner.submit("t", "train", ProcessTask("tests.worker_tasks:report", (3, "/p.png")))
    assert runner.wait(job, 120) and job.state == DONE, job.result
    assert pid_of(job) == runner.process.pid != os.getpid()
    assert [step for step, _, _ in job.losses] == [1, 2, 3]
    assert [(p.step, p.path, p.caption) for p in job.previews] == [(3, "/p.png", "a preview")]
    assert job.result.message == f"done in {tmp_path.name}, confined: True"  # same Paths there

    again = runner.submit("t", "train", ProcessTask("tests.worker_tasks:report", (1, "/q.png")))
    assert runner.wait(again, 60) and pid_of(again) == pid_of(job)  # one worker, kept


def test_in_thread_mode_runs_the_same_task_in_this_process(tmp_path, monkeypatch):
    monkeypatch.setenv("DANLU_TRAIN_IN_PROCESS", "1")
    assert JobRunner(Paths(tmp_path)).process is None
    runner = JobRunner(Paths(tmp_path), worker_process=False)
    job = runner.submit("t", "train", ProcessTask("tests.worker_tasks:report", (2, "/p.png")))
    assert runner.wait(job, 30) and job.state == DONE and pid_of(job) == os.getpid()
    assert runner.process is None


def test_interrupt_reaches_the_worker_which_saves_and_a_failure_keeps_it(runner, tmp_path):
    marker = tmp_path / "saved"
    job = runner.submit("long", "train", ProcessTask("tests.worker_tasks:until_stopped",
                                                     (str(marker),)))
    wait_for(lambda: len(job.losses) >= 3, what="steps")
    worker = runner.process.pid
    assert runner.stop()
    assert runner.wait(job, 30) and job.state == STOPPED
    step = int(marker.read_text())
    assert step >= 3 and job.result.message == f"Training interrupted at step {step}"

    failed = runner.submit("bad", "train", ProcessTask("tests.worker_tasks:refuse",
                                                       ("steps: must be at least 1, got 0",)))
    assert runner.wait(failed, 30) and failed.state == FAILED
    assert failed.result.message == "steps: must be at least 1, got 0"
    assert "Traceback" in failed.result.details and "_Refused" in failed.result.details
    after = runner.submit("t", "train", ProcessTask("tests.worker_tasks:report", (1, "/p.png")))
    assert runner.wait(after, 30) and after.state == DONE and pid_of(after) == worker


def test_a_killed_worker_fails_its_job_clearly_and_the_next_job_gets_a_fresh_one(runner,
                                                                                   tmp_path):
    job = runner.submit("long", "train", ProcessTask("tests.worker_tasks:until_stopped",
                                                     (str(tmp_path / "saved"),)))
    wait_for(lambda: len(job.losses) >= 2, what="steps")
    killed = runner.process.pid
    os.kill(killed, signal.SIGKILL)  # what the out-of-memory killer does
    assert runner.wait(job, 30) and job.state == FAILED
    message = job.result.message
    assert message.startswith(f"The training worker process (pid {killed}) was killed (SIGKILL)")
    assert "out-of-memory killer" in message and "next job starts a fresh worker" in message

    after = runner.submit("t", "train", ProcessTask("tests.worker_tasks:report", (2, "/p.png")))
    assert runner.wait(after, 120) and after.state == DONE, after.result
    assert pid_of(after) == runner.process.pid not in (killed, os.getpid())


def test_closing_the_app_lets_the_job_in_the_worker_save_then_ends_the_worker(tmp_path):
    runner = JobRunner(Paths(tmp_path), worker_process=True)
    marker = tmp_path / "saved"
    job = runner.submit("long", "train", ProcessTask("tests.worker_tasks:until_stopped",
                                                     (str(marker),)))
    wait_for(lambda: len(job.losses) >= 2, what="steps")
    process = runner.process._child.process
    assert runner.shutdown(timeout=30) is job
    assert job.state == STOPPED and marker.read_text() == str(job.result.step)
    assert process.wait(timeout=15) == 0 and runner.process.pid is None


# ------------------------------------------------------------------ real training in the worker

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    from tests.conftest import photo
    from tests.test_textual_inversion import make_embedding
    root = tmp_path_factory.mktemp("worker")
    paths = Paths(root / "data").ensure()
    shutil.copytree(tiny_model_dir, paths.cache / "tiny-demo")
    dataset = paths.data_dir / "photos"
    dataset.mkdir()
    for i, caption in enumerate(["a woman in a space suit", "a cup of coffee", "a cat"]):
        photo(i).save(dataset / f"{i:02}-img.png")
        (dataset / f"{i:02}-img.txt").write_text(caption)
    path = make_embedding(paths)
    runner = JobRunner(paths, worker_process=True)
    yield runner, paths, dataset, path
    runner.shutdown(timeout=60)


def ti_job(runner, dataset, **changes):
    from tests.test_textual_inversion import ti_config
    from webui.jobs import job_parts
    name, kind, fn, spec = job_parts("textual_inversion", ti_config(dataset, **changes))
    assert isinstance(fn, ProcessTask)
    return runner.submit(name, kind, fn, spec=spec)


def test_training_in_the_worker_streams_previews_and_interrupt_saves(trained):
    from trainers.formats.embedding import load_embedding
    runner, paths, dataset, path = trained
    job = ti_job(runner, dataset, steps=4, preview_every=2)
    assert runner.wait(job, 600) and job.state == DONE, job.result
    assert [step for step, _, _ in job.losses] == [1, 2, 3, 4]
    assert [p.step for p in job.previews] == [2, 4]
    assert all(os.path.exists(p.path) for p in job.previews)
    assert load_embedding(path).step == 4

    job = ti_job(runner, dataset, steps=100000)
    wait_for(lambda: len(job.losses) >= 2, what="steps")
    runner.stop()
    assert runner.wait(job, 120) and job.state == STOPPED, job.result
    step = load_embedding(path).step
    assert step > 4 and job.result.message.startswith(f"Training interrupted at step {step}")


def test_the_worker_keeps_the_loaded_model_for_the_next_job(trained):
    runner, paths, dataset, path = trained
    loads = []
    for _ in range(2):
        job = runner.submit("load", "train", ProcessTask("tests.worker_tasks:timed_load",
                                                         ("tiny-demo",)))
        assert runner.wait(job, 300) and job.state == DONE, job.result
        model, _, seconds, _ = next(line for line in job.log if line.startswith("model "))\
            .split()[1:]
        loads.append((model, float(seconds)))
    assert loads[0][0] == loads[1][0] and loads[1][1] < 0.5, loads  # the same object, cached

    # Train click to first step with the model loaded
    from trainers.formats.embedding import load_embedding
    steps = load_embedding(path).step + 2
    began = time.perf_counter()
    job = ti_job(runner, dataset, steps=steps, preview_every=0)
    wait_for(lambda: job.losses, timeout=60, what="the first step")
    first_step = time.perf_counter() - began
    assert runner.wait(job, 60) and job.state == DONE
    print(f"Train click to first step in the worker, model loaded: {first_step:.2f} s")
    assert first_step < 10  # 2 s on a quiet machine; room for a loaded one


@pytest.mark.parametrize("kind", ["nan", "oom"])
def test_nan_and_out_of_memory_in_the_worker_keep_the_state_and_the_next_run_works(trained,
                                                                                   kind):
    from dataclasses import asdict
    from tests.test_textual_inversion import ti_config
    from trainers.formats.embedding import load_embedding
    runner, paths, dataset, path = trained
    before = load_embedding(path).step
    cfg = ti_config(dataset, steps=before + 5)
    job = runner.submit("ti", "train", ProcessTask("tests.worker_tasks:with_failing_step",
                                                   (kind, 3, "textual_inversion", asdict(cfg))))
    assert runner.wait(job, 300) and job.state == FAILED
    if kind == "nan":
        assert f"loss became nan at step {before + 3}" in job.result.message
        # the last good state: step before+2's weights gave the NaN loss, so before+1's are kept
        assert load_embedding(path).step == before + 1
    else:
        assert job.result.message.startswith("Out of memory (CUDA out of memory.")
        assert "batch size" in job.result.message and "gradient checkpointing" in job.result.message
        assert load_embedding(path).step == before
    job = ti_job(runner, dataset, steps=load_embedding(path).step + 1)
    assert runner.wait(job, 300) and job.state == DONE, job.result


def test_when_the_app_dies_the_worker_saves_the_job_and_exits(runner, tmp_path):
    marker = tmp_path / "saved"
    job = runner.submit("long", "train", ProcessTask("tests.worker_tasks:until_stopped",
                                                     (str(marker),)))
    wait_for(lambda: len(job.losses) >= 2, what="steps")
    process = runner.process._child.process
    process.stdin.close()  # what the worker sees when the app is killed: its stdin ends
    assert process.wait(timeout=30) == 0
    assert int(marker.read_text()) >= 2


def test_the_worker_can_start_before_the_first_job_and_that_job_uses_it(runner, tmp_path):
    runner.process.start()  # as app.py does at start
    early = runner.process.pid
    assert early is not None and early != os.getpid()
    runner.process.start()  # a second call keeps the same process
    assert runner.process.pid == early
    job = runner.submit("pid", "train", ProcessTask("tests.worker_tasks:report", (1, "/p.png")))
    assert runner.wait(job, 120) and job.state == DONE, job.result
    assert pid_of(job) == early


def test_the_worker_leaves_one_cpu_to_the_server_unless_told_otherwise(monkeypatch):
    from core.worker_process import worker_threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert worker_threads({}) == 3
    assert worker_threads({"DANLU_WORKER_THREADS": "4"}) == 4
    assert worker_threads({"DANLU_WORKER_THREADS": "zero"}) == 3  # not a count: the default
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert worker_threads({}) == 1


def test_the_worker_process_runs_with_that_many_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the app's own setting...
    monkeypatch.setenv("DANLU_WORKER_THREADS", "1")  # ...which the worker's overrides
    runner = JobRunner(Paths(tmp_path).ensure(), worker_process=True)
    try:
        job = runner.submit("threads", "train",
                            ProcessTask("tests.worker_tasks:report_threads", ()))
        assert runner.wait(job, 120) and job.state == DONE, job.result
        assert "torch threads 1" in job.log
    finally:
        runner.shutdown(timeout=30)


def test_the_worker_warms_only_the_modules_it_is_told(monkeypatch):
    import sys as _sys

    from core import worker_main
    from core.worker_process import WARM_VARIABLE, WorkerProcess
    assert WorkerProcess(warm_modules=("torch", "x.y")).warm_modules == ("torch", "x.y")
    monkeypatch.delitem(_sys.modules, "colorsys", raising=False)
    monkeypatch.setenv(WARM_VARIABLE, "colorsys, no_such_module_here")
    worker_main._warm_imports()  # a module that cannot be imported is left to the job to report
    assert "colorsys" in _sys.modules


def test_the_app_names_the_training_libraries_for_the_worker_to_warm():
    import app
    assert "trainers.models" in app.WORKER_WARM_MODULES
