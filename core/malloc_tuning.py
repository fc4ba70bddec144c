"""glibc's malloc for training: large blocks (≥ 1 MiB) get their own mappings and go back to the
system when freed, and the heap is trimmed above 1 MiB of free space. glibc's default raises its
mmap threshold up to 32 MiB as blocks are freed, so a step's activations then stay in a heap that
only grows: on the SD1.5-shaped LoRA bench that was ~380 MiB more peak RSS and slower steps
(BENCHMARKS.md). A no-op off glibc; DANLU_MALLOC_TUNING=0 turns it off."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20
_done: bool | None = None


def tune_malloc() -> bool:
    """Set the thresholds once per process; True if glibc took them."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("DANLU_MALLOC_TUNING", "1").strip() in ("0", "false", "no"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    return _done
