"""Importing trainers makes torch's CPU BLAS independent of the weights' memory alignment, the
cause of DreamBooth's inexact resume (issue #23 item 13; trainers/reproducible_blas.py); a
resume with another thread count, which can differ in the last bits, says so."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.reproducible_blas import STRICT, VARIABLE, blas_mode, prefer_reproducible_blas

ROOT = Path(__file__).resolve().parent.parent

# A Linear on one row (a matrix-vector product) with the same weights at 64-byte-aligned and
# misaligned addresses, as memory-mapped .safetensors weights sit; prints the offsets that
# changed the result, then MKL's mode.
ALIGNMENT_CHECK = """
import sys
if sys.argv[1] == "import":
    import trainers
import torch
def at(tensor, offset):
    block = torch.empty(tensor.numel() + 64)
    start = (-block.data_ptr() // 4) % 16 + offset // 4
    placed = block[start:start + tensor.numel()].view(tensor.shape)
    placed.copy_(tensor)
    return placed
generator = torch.Generator().manual_seed(0)
weight, bias = torch.randn(1280, 320, generator=generator), torch.randn(1280, generator=generator)
row = torch.randn(1, 320, generator=generator)
aligned = torch.nn.functional.linear(row, at(weight, 0), at(bias, 0))
print([offset for offset in (4, 8, 24, 60) if not torch.equal(
    aligned, torch.nn.functional.linear(row, at(weight, offset), at(bias, offset)))])
from trainers.reproducible_blas import blas_mode  # after the products: sets nothing in time
print(blas_mode())
"""


def run_check(how: str, **env_extra) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    done = subprocess.run([sys.executable, "-c", ALIGNMENT_CHECK, how], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL")
def test_after_importing_trainers_a_one_row_linear_gives_the_same_bits_wherever_its_weights_sit():
    differing, mode = run_check("import")
    assert differing == "[]", f"misaligned weights at byte offsets {differing} changed the result"
    assert mode == "MKL AUTO,STRICT"


def test_a_users_own_mkl_mode_is_kept():
    environ = {}
    prefer_reproducible_blas(environ)
    assert environ == {VARIABLE: STRICT}
    environ = {VARIABLE: "COMPATIBLE"}
    prefer_reproducible_blas(environ)
    assert environ == {VARIABLE: "COMPATIBLE"}
    if torch.backends.mkl.is_available():
        assert run_check("import", MKL_CBWR="COMPATIBLE")[1] == "MKL COMPATIBLE"


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL")
@pytest.mark.skipif(os.environ.get(VARIABLE) != STRICT, reason="the user chose MKL's mode")
def test_the_test_processes_use_the_strict_mode():
    # the exact-resume tests compare bits: they rely on trainers being imported before torch's
    # first BLAS call here too
    assert blas_mode() == "MKL AUTO,STRICT"


def test_a_resume_with_another_thread_count_says_it_repeats_only_up_to_rounding(
        data_paths, photo_dataset):
    from core.events import Status
    from tests.conftest import RecordingContext
    from tests.test_textual_inversion import make_embedding, ti_config
    from trainers.methods.textual_inversion import run
    make_embedding(data_paths)
    cfg = ti_config(photo_dataset, steps=3)
    threads = torch.get_num_threads()

    def resume_with(count: int) -> list[str]:
        torch.set_num_threads(count)
        ctx = RecordingContext(data_paths, stop_after=1)
        run(cfg, ctx)
        return [status.text for status in ctx.of(Status)]
    try:
        run(cfg, RecordingContext(data_paths, stop_after=1))
        same = resume_with(threads)
        other = resume_with(threads + 1)
    finally:
        torch.set_num_threads(threads)
    assert "Resuming at step 1 with the saved optimizer state" in same
    assert not any("CPU threads" in text for text in same)
    assert "Resuming at step 2 with the saved optimizer state" in other
    assert (f"Saved with {threads} CPU threads, resumed with {threads + 1}: the steps repeat an "
            "uninterrupted run up to rounding, not bit for bit") in other
