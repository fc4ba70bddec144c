"""XTI embedding files in kohya's layout (sd-scripts' train_textual_inversion_XTI.py): one tensor
[n_vectors, dim] per cross-attention layer, keyed by the layer's name (IN01 ... MID ... OUT11),
as .safetensors (or a plain torch dict in .pt). Danlu adds the name and step in the safetensors
header metadata, which kohya's loader ignores."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from core.atomic import atomic_write_bytes
from trainers.formats.save_check import check_savable
from trainers.formats.safe_load import NotATorchFileError, UnsafeFileError, safe_torch_load, \
    save_torch_legacy

SUFFIXES = (".safetensors", ".pt")


class XtiFormatError(ValueError):
    """Not a readable XTI file; the message names the file."""


@dataclass
class XtiFile:
    name: str
    layers: dict[str, torch.Tensor]  # layer name -> [n_vectors, dim] float32, in layer order
    step: int = 0


def save_xti(path: str | Path, xti: XtiFile) -> None:
    path = Path(path)
    state = {key: value.detach().float().cpu().contiguous() for key, value in xti.layers.items()}
    check_savable(Path(path).name, state)
    _check(state, path)
    if path.suffix == ".pt":
        save_torch_legacy(state, path)
        return
    metadata = {"danlu.name": xti.name, "danlu.step": str(int(xti.step)), "danlu.kind": "xti"}
    atomic_write_bytes(path, safetensors.torch.save(state, metadata=metadata))


def load_xti(path: str | Path) -> XtiFile:
    path = Path(path)
    try:
        if path.suffix == ".pt":
            state, metadata = safe_torch_load(path), {}
        else:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (UnsafeFileError, NotATorchFileError, OSError, safetensors.SafetensorError) as error:
        raise XtiFormatError(f"{path.name}: not a readable XTI file ({error})") from None
    if not isinstance(state, dict):
        raise XtiFormatError(f"{path.name}: not a dict of per-layer tensors")
    state = {str(key): value for key, value in state.items()}
    _check(state, path)
    try:
        step = int(metadata.get("danlu.step", 0))
    except ValueError:
        step = 0
    return XtiFile(name=metadata.get("danlu.name", path.stem),
                   layers={key: value.float() for key, value in state.items()}, step=step)


def _check(state: dict, path: Path) -> None:
    if not state:
        raise XtiFormatError(f"{path.name}: holds no layers")
    shapes = set()
    for key, value in state.items():
        if not torch.is_tensor(value) or value.dim() != 2:
            raise XtiFormatError(f"{path.name}: layer {key} is not a [vectors, dim] tensor")
        shapes.add(tuple(value.shape))
    if len(shapes) != 1:
        raise XtiFormatError(f"{path.name}: layers have different shapes {sorted(shapes)}")
