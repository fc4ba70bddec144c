"""Give back the resident memory of weights a run no longer touches (the VAE once latents are
cached, a frozen text encoder once its outputs are cached).

Base models load from .safetensors memory-mapped: the weights are pages of the file, resident
(and counted in the process's RSS) once read. `page_out` asks the kernel to reclaim those pages
(madvise MADV_PAGEOUT, Linux 5.4+). It never changes what the tensors hold: a page read again
later (a preview decoding through the VAE) comes back from the file or the page cache. Memory that
is not file-backed (weights converted at load, CUDA tensors) has no file to come back from and
stays as it is; on other systems this does nothing."""
from __future__ import annotations

import ctypes
import mmap
import sys

import torch

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
            if high > low and madvise(low, high - low, MADV_PAGEOUT) == 0:
                asked += high - low
    return asked
