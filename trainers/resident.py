"""Give back the resident memory of weights a run no longer touches (the VAE once latents are
cached, a frozen text encoder once its outputs are cached).

Base models load from .safetensors memory-mapped: the weights are pages of the file, resident
(and counted in the process's RSS) once read. `page_out` drops those pages from the process
(madvise MADV_DONTNEED, only when every resident page of the tensor is still the file's own,
never a written copy) or else asks the kernel to reclaim them (MADV_PAGEOUT, a hint). It never
changes what the tensors hold: a page read again later (a preview decoding through the VAE) comes
back from the page cache or the file. Memory that is not file-backed (weights converted at load,
CUDA tensors) stays as it is; on other systems this does nothing."""
from __future__ import annotations

import ctypes
import mmap
import struct
import sys

import torch

MADV_DONTNEED = 4
MADV_PAGEOUT = 21
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def page_out(*modules) -> int:
    """Hint the kernel to reclaim the pages of these modules' CPU weights; returns the bytes
    asked for (0 where it does not apply). Only whole pages inside each tensor's bytes."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        madvise = _madvise()
    except (OSError, AttributeError):
        return 0
    page = mmap.PAGESIZE
    asked, seen = 0, set()
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in list(module.parameters()) + list(module.buffers()):
            # the tensor's own bytes: one storage may hold a whole file's tensors
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                continue
            start = tensor.data_ptr()
            if not start or start in seen:
                continue
            seen.add(start)
            low = -(-start // page) * page
            high = (start + tensor.numel() * tensor.element_size()) // page * page
            if high <= low:
                continue
            # pages only mapped from the file can be dropped outright (they read back the same);
            # another process mapping the same file (e.g. a second trainer) keeps its own copy.
            # Anything written since (copy-on-write) or unknown only gets the reclaim hint.
            advice = MADV_DONTNEED if _file_pages_only(low, high, page) else MADV_PAGEOUT
            if madvise(low, high - low, advice) == 0:
                asked += high - low
    return asked


def _file_pages_only(low: int, high: int, page: int) -> bool:
    """Every page in [low, high) is a resident file page (bit 61 of /proc/self/pagemap) or was
    never touched: none a private copy, none swapped out."""
    try:
        with open("/proc/self/pagemap", "rb") as handle:
            handle.seek(low // page * 8)
            data = handle.read((high - low) // page * 8)
    except OSError:
        return False
    if len(data) != (high - low) // page * 8:
        return False
    return all(_droppable(entry) for (entry,) in struct.iter_unpack("<Q", data))


def _droppable(entry: int) -> bool:
    """A pagemap entry MADV_DONTNEED may drop without changing what the memory holds: a present
    file page, or a page never touched. A swapped-out page (bit 62) may be the only copy of
    anonymous data (weights converted at load, on a machine with swap): dropping it would read
    back zeros."""
    present, swapped, file_page = entry >> 63 & 1, entry >> 62 & 1, entry >> 61 & 1
    if swapped:
        return False
    return bool(file_page) if present else True
