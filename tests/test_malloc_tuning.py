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


HUGE_PAGES_CHECK = """
import os, sys
from core.malloc_tuning import prefer_huge_pages
print("on" if prefer_huge_pages() else "off")
import torch


def advised(address):  # the kernel marks a mapping given MADV_HUGEPAGE with VmFlags 'hg'
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return "hg" in line.split()[1:]
    raise AssertionError("no mapping holds the block")


blocks = [torch.empty(3 << 20, dtype=torch.uint8) for _ in range(3)]  # kept alive while read
marks = [advised(block.data_ptr()) for block in blocks]
print("advised" if all(marks) else "plain" if not any(marks) else "mixed")
"""


def run_huge_pages_check(env_extra: dict, drop=()) -> list[str]:
    import os
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in drop}
    done = subprocess.run([sys.executable, "-c", HUGE_PAGES_CHECK], cwd=root, capture_output=True,
                          text=True, env=dict(env, PYTHONPATH=str(root), **env_extra), timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's THP allocation is Linux only")
def test_torch_takes_huge_pages_for_large_blocks_when_asked_before_import():
    assert run_huge_pages_check({}, drop=("THP_MEM_ALLOC_ENABLE",)) == ["on", "advised"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's THP allocation is Linux only")
def test_huge_pages_follow_the_switch_and_a_users_own_setting():
    assert run_huge_pages_check({"DANLU_MALLOC_TUNING": "0"},
                                drop=("THP_MEM_ALLOC_ENABLE",)) == ["off", "plain"]
    assert run_huge_pages_check({"THP_MEM_ALLOC_ENABLE": "0"}) == ["off", "plain"]


def test_prefer_huge_pages_keeps_what_the_user_set():
    from core.malloc_tuning import prefer_huge_pages
    environ = {}
    assert prefer_huge_pages(environ) and environ == {"THP_MEM_ALLOC_ENABLE": "1"}
    environ = {"THP_MEM_ALLOC_ENABLE": "0"}
    assert not prefer_huge_pages(environ) and environ["THP_MEM_ALLOC_ENABLE"] == "0"
    environ = {"DANLU_MALLOC_TUNING": "no"}
    assert not prefer_huge_pages(environ) and "THP_MEM_ALLOC_ENABLE" not in environ
