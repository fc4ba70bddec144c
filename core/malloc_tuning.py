"""glibc's malloc for training: large blocks (≥ 1 MiB) get their own mappings and go back to the
system when freed, and the heap is trimmed above 1 MiB of free space. glibc's default raises its
mmap threshold up to 32 MiB as blocks are freed, so a step's activations then stay in a heap that
only grows: on the SD1.5-shaped LoRA bench that was ~380 MiB more peak RSS and slower steps
(BENCHMARKS.md). Every block of 1 MiB or more is then a fresh mapping, so its pages fault in on
first touch; torch's THP_MEM_ALLOC_ENABLE makes its blocks of 2 MiB or more ask for huge pages,
which cuts those faults ~500x (the 1 MiB threshold alone made SD1.5 LoRA steps 10-17 % slower
on one thread). torch reads that variable once, at its first allocation, so entry points call
`prefer_huge_pages()` before importing torch. A no-op off glibc; DANLU_MALLOC_TUNING=0 turns
both off."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"
_done: bool | None = None


def _enabled(environ=os.environ) -> bool:
    return environ.get("DANLU_MALLOC_TUNING", "1").strip() not in ("0", "false", "no")


def prefer_huge_pages(environ=os.environ) -> bool:
    """Ask torch for transparent huge pages on its large CPU blocks, unless the user set the
    variable or turned tuning off; True if it is on. Has effect only before torch's first
    allocation (the kernel must allow THP: `madvise` or `always`)."""
    if _enabled(environ):
        environ.setdefault(HUGE_PAGES_VARIABLE, "1")
    return environ.get(HUGE_PAGES_VARIABLE, "0").strip() not in ("", "0")


def tune_malloc() -> bool:
    """Set the thresholds once per process; True if glibc took them."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not _enabled():
        return False
    prefer_huge_pages()  # for child processes; this one's torch may have read it already
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    return _done
