"""Closing mid-run keeps the work: SIGTERM to a CLI training leaves a resumable state, and the
JobRunner's shutdown lets the running job save before the app exits (the app itself is tested
over HTTP in test_security_app.py)."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time

from core import events as ev
from core.jobs import STOPPED, Busy, JobRunner
from core.paths import Paths
from tests.conftest import ROOT, cli_embedding_run


def test_sigterm_to_the_cli_saves_a_resumable_state(tmp_path, tiny_model_dir, photo_dataset):
    from trainers.formats.embedding import embedding_checksum, load_embedding
    from trainers.formats.optim_sidecar import load_optim, optim_path

    data, config, path = cli_embedding_run(tmp_path, tiny_model_dir, photo_dataset, steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "trainers", "textual_inversion", "--config",
                             str(config), "--data-dir", str(data)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    seen, rest = b"", b""
    deadline = time.time() + 90
    try:
        while b"loss=" not in seen:  # tqdm's first progress line
            assert time.time() < deadline and proc.poll() is None, seen.decode(errors="replace")
            if select.select([proc.stderr], [], [], 0.5)[0]:
                seen += os.read(proc.stderr.fileno(), 65536)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (seen + rest).decode(errors="replace")
    assert proc.returncode == 143, output  # 128 + SIGTERM, after saving: scripts can tell
    assert "Stopping after this step and saving" in output
    assert "Traceback" not in output
    saved = load_embedding(path)
    assert saved.step > 0
    assert f"Training interrupted at step {saved.step}; saved {path}" in output
    assert optim_path(path).exists()
    assert load_optim(path, embedding_checksum(saved.vectors))[0] is not None


def test_shutdown_stops_the_running_job_drops_the_queue_and_refuses_new_jobs(tmp_path):
    runner = JobRunner(Paths(tmp_path))
    started = threading.Event()
    saved = []

    def train(ctx):
        started.set()
        step = 0
        while not ctx.should_stop():
            step += 1
            time.sleep(0.01)
        time.sleep(0.2)  # saving takes a moment
        saved.append(step)
        ctx.emit(ev.Finished(step=step, message=f"Training interrupted at step {step}"))

    job = runner.submit("long", "train", train)
    queued = runner.submit("next", "train", lambda ctx: saved.append("ran"), queue=True)
    assert started.wait(10)
    assert runner.shutdown(timeout=10) is job
    assert not job.active and job.state == STOPPED and saved and saved[0] > 0
    assert job.result.message.startswith("Training interrupted")
    assert queued.state == STOPPED and "app closed" in queued.result.message
    assert "ran" not in saved
    try:
        runner.submit("late", "train", lambda ctx: None)
    except Busy as error:
        assert "shutting down" in str(error)
    else:
        raise AssertionError("a job was accepted after shutdown")


def test_shutdown_waits_only_as_long_as_it_is_told(tmp_path):
    runner = JobRunner(Paths(tmp_path))
    release = threading.Event()
    job = runner.submit("stuck", "train", lambda ctx: release.wait(10))  # never checks the flag
    time.sleep(0.1)
    began = time.time()
    assert runner.shutdown(timeout=0.5) is job
    assert 0.4 < time.time() - began < 5 and job.active
    release.set()
    assert runner.wait(job, 10)
    assert JobRunner(Paths(tmp_path)).shutdown(timeout=1) is None  # nothing running
