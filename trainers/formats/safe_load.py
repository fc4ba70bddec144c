"""Load and save pickled torch files that contain only tensors and plain values.

Loading never runs code from the file. Saving writes the legacy (non-zip) torch format, because
torch 2.13's zip format adds `.format_version` / `.storage_alignment` records that A1111's safe
unpickler refuses, and it refuses anything A1111 or `torch.load(weights_only=True)` would refuse.
"""
from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

import torch

from core.atomic import atomic_write
from core.unpickle_errors import (refused_globals, refused_message, weights_only_refusal,
                                  without_unsafe_advice)

# Storage types A1111's safe unpickler accepts in a legacy file.
SAVABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
                  torch.int64, torch.uint8)
_SCALAR_TYPES = (str, int, float, bool, type(None))
_CONTAINER_TYPES = (list, tuple, dict, OrderedDict)


class UnsafeFileError(ValueError):
    """The file holds pickled Python objects that could run code; it was not loaded."""

    def __init__(self, path: Path, found: list[str], shown: str | None = None):
        self.path = path
        self.found = found
        detail = ", ".join(found) if found else "unknown objects"
        super().__init__(f"{shown or path.name}: refused to load: it contains Python objects other than "
                         f"tensors and plain containers (it wants {detail}; nothing in it was "
                         "run)")


class NotATorchFileError(ValueError):
    """The file is not a PyTorch file, or it is truncated or corrupted."""

    def __init__(self, path: Path, detail: str):
        self.path = path
        super().__init__(f"{path.name}: not a readable PyTorch file (is it truncated, or a "
                         f"different format?): {detail}")


class NotASafetensorsFileError(ValueError):
    """A .safetensors file whose header does not describe its contents."""

    def __init__(self, path: Path, detail: str):
        self.path = path
        super().__init__(f"{path.name}: not a readable safetensors file (is it truncated, or a "
                         f"different format?): {detail}")


# suffixes of files that hold a pickle (`.optim`: Danlu's optimizer sidecar)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".optim")


def check_loadable(path: str | Path) -> None:
    """Raise unless `path` is a .safetensors file whose header is sound (no tensor is read) or
    a pickle that the restricted loader reads: UnsafeFileError (naming the globals it wanted),
    NotATorchFileError, NotASafetensorsFileError, or ValueError for any other kind of file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        import safetensors
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
                handle.keys()
                handle.metadata()
        except OSError:
            raise
        except Exception as error:  # SafetensorError: a bad header, offsets past the end, ...
            raise NotASafetensorsFileError(path, _first_line(error)) from None
    elif suffix in PICKLE_SUFFIXES:
        safe_torch_load(path, mmap=zipfile.is_zipfile(path))  # a zip file is mapped, not read
    else:
        raise ValueError(f"{path.name}: not a file type Danlu can check ({suffix or 'no suffix'}; "
                         "expected .safetensors or a torch pickle)")


def safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    """torch.load on the CPU with weights_only=True, with errors that say what is wrong.
    `mmap` maps a zip-format file instead of reading it (not for the legacy format)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = refused_globals(str(error))
        if not found:
            found = _pickle_globals(path) or []
        if found:
            raise UnsafeFileError(path, sorted(set(found))) from None
        raise NotATorchFileError(path, _first_line(error)) from None
    except OSError:
        raise
    except Exception as error:  # EOFError, zip errors (RuntimeError), bad magic number, ...
        raise NotATorchFileError(path, f"{type(error).__name__}: {_first_line(error)}") from None


def explain_refusal(error: BaseException, where: Path | None = None) -> str | None:
    """For an error a library raised while loading weights (diffusers, transformers): when it
    is a weights-only refusal, '<file>: refused to load: ... (it wants <global>; ...)' naming the
    refused pickle (looked for in the error's text, then under the folder `where`, relative to
    it); None for any other error. torch's advice to load with weights_only=False never shows."""
    refusal = weights_only_refusal(error)
    if refusal is None:
        return None
    texts, link = [], error
    while link is not None and len(texts) < 10:
        texts.append(str(link))
        link = link.__cause__ or link.__context__
    named = [Path(p) for p in re.findall(r"'([^']+\.(?:bin|pt|pth|ckpt))'", "\n".join(texts))]
    under = []
    if where is not None and Path(where).is_dir():
        under = sorted(p for p in Path(where).rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES
                       and p.is_file())
    root = Path(where) if where is not None and Path(where).is_dir() else None
    for candidate in dict.fromkeys(named + under):
        if not candidate.is_file():
            continue
        try:
            safe_torch_load(candidate, mmap=zipfile.is_zipfile(candidate))
        except UnsafeFileError as refused:
            shown = candidate.relative_to(root).as_posix() if root and root in candidate.parents \
                else candidate.name
            return str(UnsafeFileError(candidate, refused.found, shown))
        except (NotATorchFileError, OSError):
            continue
    return refused_message("a weights file", str(refusal))


def _first_line(error: BaseException) -> str:
    """The first line of the error's reason (torch's advice to load unsafely left out)."""
    text = without_unsafe_advice(str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _pickle_globals(path: Path) -> list[str] | None:
    """The globals named by the file's pickle opcodes, read without executing anything.

    None when the data does not parse as a pickle at all.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    return None
                with archive.open(names[0]) as stream:
                    return _scan_pickles(stream, max_pickles=1)
        with open(path, "rb") as stream:
            # a legacy torch file is five pickles followed by raw storage bytes
            return _scan_pickles(stream, max_pickles=5)
    except (OSError, zipfile.BadZipFile):
        return None


def _scan_pickles(stream: IO[bytes], max_pickles: int) -> list[str] | None:
    found: list[str] = []
    for index in range(max_pickles):
        strings: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]) if len(strings) >= 2 else "STACK_GLOBAL")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:
            return found if (found or index > 0) else None
    return found


def check_plain(obj: Any, where: str = "value") -> None:
    """Raise TypeError unless obj holds only tensors, str, int, float, bool, None, lists,
    tuples and dicts (numpy scalars, dataclasses, Paths, ... are refused)."""
    _plain_copy(obj, where)


def _plain_copy(obj: Any, where: str) -> Any:
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        if obj.dtype not in SAVABLE_DTYPES:
            raise TypeError(f"cannot save {where}: tensor dtype {obj.dtype} is not one of "
                            f"{', '.join(str(d) for d in SAVABLE_DTYPES)}")
        tensor = obj.detach().to("cpu").contiguous()
        # torch.save writes a view's whole storage; copy so only these values are written
        if tensor.storage_offset() != 0 or \
                tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        return tensor
    if kind in _SCALAR_TYPES:
        return obj
    if kind in (list, tuple):
        items = [_plain_copy(item, f"{where}[{i}]") for i, item in enumerate(obj)]
        return items if kind is list else tuple(items)
    if kind in (dict, OrderedDict):
        copy = {}
        for key, value in obj.items():
            if type(key) not in _SCALAR_TYPES:
                raise TypeError(f"cannot save {where}: key {key!r} is a "
                                f"{_type_name(key)}, not str/int/float/bool/None")
            copy[key] = _plain_copy(value, f"{where}[{key!r}]")
        return copy if kind is dict else OrderedDict(copy)
    raise TypeError(f"cannot save {where}: {_type_name(obj)} is not a plain type (allowed: "
                    "torch.Tensor, str, int, float, bool, None, list, tuple, dict); convert it, "
                    "e.g. with float(), int() or .item()")


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else \
        f"{kind.__module__}.{kind.__qualname__}"


def save_torch_legacy(obj: Any, path: str | Path) -> None:
    """torch.save in the legacy format, atomically, after checking obj is plain (TypeError)."""
    plain = _plain_copy(obj, "value")
    atomic_write(path, lambda temp: torch.save(plain, temp, _use_new_zipfile_serialization=False))
