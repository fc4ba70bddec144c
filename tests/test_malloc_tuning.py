"""Training sets glibc's mmap/trim thresholds once (core/malloc_tuning.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import ctypes, ctypes.util, sys
from core.malloc_tuning import tune_malloc, THRESHOLD
ok = tune_malloc()
assert tune_malloc() is ok  # once per process
# a freed block just over the threshold goes straight back to the system: mallinfo2's mmapped
# bytes rise while it is held and fall when it is freed
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
for _ in range(3):  # without the fixed threshold glibc raises it after the first free
    block = libc.malloc(THRESHOLD + 4096)
    held = libc.mallinfo2().hblkhd
    libc.free(block)
    assert held - libc.mallinfo2().hblkhd >= THRESHOLD, "not mmapped"
print("tuned" if ok else "off")
"""


def run_check(env_extra: dict) -> subprocess.CompletedProcess:
    import os
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", CHECK], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(root), **env_extra), timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_go_back_to_the_system_after_tuning():
    done = run_check({})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tuned"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_it_can_be_turned_off_and_then_glibc_keeps_its_dynamic_threshold():
    done = run_check({"DANLU_MALLOC_TUNING": "0"})
    assert done.returncode != 0 and "not mmapped" in done.stderr
