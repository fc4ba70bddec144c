"""Optimizer state kept next to a saved file as `<file>.optim`, so training can resume.

Layout (as A1111 writes it): {"hash": checksum of the file's values, "optimizer_name": str,
"optimizer_state_dict": dict}, plus Danlu's own plain values under "danlu". The hash pairs the
sidecar with the exact file it was saved with; a stale sidecar is ignored, with a reason.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from core.atomic import recover, together
from trainers.formats.safe_load import (NotATorchFileError, UnsafeFileError, safe_torch_load,
                                        save_torch_legacy)

SUFFIX = ".optim"


def optim_path(file_path: str | Path) -> Path:
    file_path = Path(file_path)
    return file_path.with_name(file_path.name + SUFFIX)


def pair_journal(file_path: str | Path) -> Path:
    file_path = Path(file_path)
    return file_path.with_name(f".{file_path.name}.pair")


@contextlib.contextmanager
def saving_pair(file_path: str | Path) -> Iterator[None]:
    """The file and its sidecar (and any other file written in the block) reach their final
    names together when the block succeeds; a failure leaves the previous pair."""
    with together(pair_journal(file_path)):
        yield


def recover_pair(file_path: str | Path, others: tuple = ()) -> str | None:
    """Finish or drop a pair save that was interrupted (a crash, a kill); run before reading."""
    file_path = Path(file_path)
    return recover(pair_journal(file_path), [file_path, optim_path(file_path), *map(Path, others)])


def save_optim(file_path: str | Path, checksum: str, optimizer_name: str,
               state_dict: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write `<file_path>.optim` atomically; TypeError if anything in it is not plain."""
    payload: dict[str, Any] = {
        "hash": checksum,
        "optimizer_name": optimizer_name,
        "optimizer_state_dict": state_dict,
    }
    if extra is not None:
        payload["danlu"] = extra
    target = optim_path(file_path)
    save_torch_legacy(payload, target)
    return target


def load_optim(file_path: str | Path, checksum: str) -> tuple[dict[str, Any] | None, str]:
    """(payload, reason): payload is None when the sidecar is missing, stale or unreadable."""
    target = optim_path(file_path)
    if not target.is_file():
        return None, f"no optimizer state saved next to {Path(file_path).name} ({target.name} " \
                     "not found); the optimizer starts fresh"
    try:
        payload = safe_torch_load(target)
    except (UnsafeFileError, NotATorchFileError, OSError) as error:
        return None, f"{target.name} is unreadable, the optimizer starts fresh: {error}"
    if not isinstance(payload, dict) or not isinstance(payload.get("optimizer_state_dict"), dict):
        return None, f"{target.name} holds no optimizer_state_dict; the optimizer starts fresh"
    saved_hash = payload.get("hash")
    if saved_hash != checksum:
        return None, f"{target.name} was saved with a different version of " \
                     f"{Path(file_path).name} (hash {saved_hash} != {checksum}); " \
                     "the optimizer starts fresh"
    payload.setdefault("optimizer_name", "")
    name = payload["optimizer_name"] or "optimizer"
    return payload, f"resumed {name} state from {target.name}"
