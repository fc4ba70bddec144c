"""Make torch's CPU BLAS give the same bits wherever the weights sit in memory, for exact resume.

Intel MKL (torch's BLAS on x86) computes a matrix-vector product, which is what a Linear layer
does to a single row (the U-Net's time embedding at batch size 1, SDXL's pooled projection), in
an order that depends on the weights' address alignment. Weights memory-mapped from a
.safetensors file sit at the file's offsets (8-byte aligned); weights converted at load (an fp16
file read as fp32) are fresh 64-byte-aligned blocks. So a DreamBooth run resumed from its saved
file computed the same step on the same values with different rounding (issue #23 item 13).
MKL's conditional numerical reproducibility in strict mode (MKL_CBWR=AUTO,STRICT) removes the
dependence on alignment at no measurable cost. MKL reads the variable once, at its first call,
so importing `trainers` sets it (a user's own value stays): every process that trains imports
this package before it computes anything.

Not covered, by any setting: torch's own CPU reductions (a sum, layer norm's weight gradients)
split their work by thread, so a run resumed with a different thread count can differ in the
last bits; the sidecar records the count, and the loop says so when a resume's differs."""
from __future__ import annotations

import os

VARIABLE = "MKL_CBWR"
STRICT = "AUTO,STRICT"
_ALL, _STRICT_FLAG = -1, 0x10000
_BRANCHES = {0: "unset", 1: "off", 2: "AUTO", 3: "COMPATIBLE"}


def prefer_reproducible_blas(environ=os.environ) -> None:
    """Ask MKL for strict reproducibility unless the user chose a mode; has effect only before
    MKL's first call in this process."""
    environ.setdefault(VARIABLE, STRICT)


def blas_mode() -> str:
    """The mode MKL uses in this process, for messages: e.g. "MKL AUTO,STRICT", "MKL off";
    "no MKL" where torch is built without it or the mode cannot be read."""
    import ctypes

    import torch
    if not torch.backends.mkl.is_available():
        return "no MKL"
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        get = ctypes.CDLL(library).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return "MKL (mode unknown)"
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    mode = get(_ALL)
    branch = _BRANCHES.get(mode & 0xFFFF, hex(mode & 0xFFFF))
    return f"MKL {branch}{',STRICT' if mode & _STRICT_FLAG else ''}"
