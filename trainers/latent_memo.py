"""VAE latent distributions kept between runs in one process, so the next Train click with the
same (cached) model and images skips the VAE: on an SD-sized model encoding is most of the time
from the click to the first step.

Kept per VAE object (dropped with it) and only while its weights are unchanged (torch's in-place
version counters); per image file (path, size, mtime) and everything that decides its pixels.
What is kept is the distribution (mean, std); each run still samples its latents with its own
seed. At most MAX_BYTES are kept; the oldest images go first."""
from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict

import torch

MAX_BYTES = 256 * 2**20

_lock = threading.Lock()
_memos: "weakref.WeakKeyDictionary[torch.nn.Module, _Memo]" = weakref.WeakKeyDictionary()


class _Memo:
    def __init__(self, version):
        self.version = version
        self.items: OrderedDict[tuple, tuple] = OrderedDict()
        self.bytes = 0


def _version(vae) -> tuple | None:
    """Changes when any weight is replaced or changed in place, moved or cast (None: a VAE
    without parameters to check is never memoized)."""
    if not isinstance(vae, torch.nn.Module):
        return None
    return tuple((id(p), p._version, p.dtype, p.device) for p in vae.parameters())


def image_key(path, *parts) -> tuple | None:
    """The key of an image file as it is now, with what decides its pixels; None if unreadable."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (str(path), stat.st_size, stat.st_mtime_ns) + tuple(parts)


def get(vae, key: tuple | None):
    if key is None:
        return None
    with _lock:
        memo = _memos.get(vae)
        if memo is None or memo.version is None or memo.version != _version(vae):
            return None
        value = memo.items.get(key)
        if value is not None:
            memo.items.move_to_end(key)
        return value


def put(vae, key: tuple | None, value: tuple) -> None:
    if key is None:
        return
    size = sum(t.numel() * t.element_size() for t in value if torch.is_tensor(t))
    with _lock:
        version = _version(vae)
        if version is None:
            return
        memo = _memos.get(vae)
        if memo is None or memo.version != version:
            memo = _memos[vae] = _Memo(version)
        if key in memo.items:
            return
        memo.items[key] = value
        memo.bytes += size
        while memo.bytes > MAX_BYTES and len(memo.items) > 1:
            _, old = memo.items.popitem(last=False)
            memo.bytes -= sum(t.numel() * t.element_size() for t in old if torch.is_tensor(t))
