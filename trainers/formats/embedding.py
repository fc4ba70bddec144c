"""Textual-inversion embedding files: A1111 `.pt`, kohya/diffusers `.safetensors`, images.

SD1/SD2 vectors are one tensor [n_vectors, dim]; SDXL vectors are {"clip_l": [n, 768],
"clip_g": [n, 1280]}. A1111 reads an SDXL file as "every entry is a tensor", so SDXL `.pt`
and image payloads hold only those two keys: their name and step are not stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

from core.atomic import atomic_write_bytes
from trainers.formats.save_check import check_savable
from trainers.formats.safe_load import NotATorchFileError, safe_torch_load, save_torch_legacy

Vectors = torch.Tensor | dict[str, torch.Tensor]

SDXL_KEYS = ("clip_l", "clip_g")
TORCH_SUFFIXES = (".pt", ".bin")
IMAGE_SUFFIXES = (".png", ".webp")
A1111_TOKEN_ID = 265  # the id A1111 writes in string_to_token; it is never read back


class EmbeddingFormatError(ValueError):
    """A file that is not a readable embedding; the message names the file."""


@dataclass
class EmbeddingFile:
    name: str
    vectors: Vectors  # [n, dim] float32; SDXL: {"clip_l": [n, 768], "clip_g": [n, 1280]}
    step: int | None = None
    sd_checkpoint: str | None = None  # 10-hex short hash of the base model, or None
    sd_checkpoint_name: str | None = None

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.vectors, dict)

    @property
    def num_vectors(self) -> int:
        first = self.vectors[SDXL_KEYS[0]] if isinstance(self.vectors, dict) else self.vectors
        return int(first.shape[0])


def save_embedding(path: str | Path, emb: EmbeddingFile) -> None:
    """Write `emb` in the format given by the suffix (.pt/.bin or .safetensors)."""
    path = Path(path)
    suffix = path.suffix.lower()
    vectors = emb.vectors if emb.is_sdxl else {"vectors": emb.vectors}
    check_savable(path.name, vectors, torch.float32)
    if suffix in TORCH_SUFFIXES:
        save_torch_legacy(to_a1111_dict(emb), path)
    elif suffix == ".safetensors":
        tensors = _sdxl_vectors(emb.vectors, path) if emb.is_sdxl else \
            {"emb_params": _as_2d_float(emb.vectors, path, "vectors")}
        atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=_metadata(emb)))
    elif suffix in IMAGE_SUFFIXES:
        raise ValueError(f"{path.name}: use save_png_embedding() for images (it needs a preview)")
    else:
        raise ValueError(f"{path.name}: unknown embedding suffix {path.suffix!r}; "
                         "use .pt, .bin or .safetensors")


def load_embedding(path: str | Path) -> EmbeddingFile:
    """Read any embedding A1111 reads: .pt/.bin, .safetensors, .png/.webp.

    Raises EmbeddingFormatError (naming the file) for anything that is not an embedding, and
    trainers.formats.safe_load.UnsafeFileError for a pickle holding arbitrary objects.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise EmbeddingFormatError(f"{path}: no such file")
    if suffix in TORCH_SUFFIXES:
        try:
            data = safe_torch_load(path)
        except NotATorchFileError as error:
            raise EmbeddingFormatError(str(error)) from None
        return embedding_from_dict(data, path)
    if suffix == ".safetensors":
        try:
            with safetensors.safe_open(path, framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # SafetensorError, invalid header, truncated file
            raise EmbeddingFormatError(f"{path.name}: not a readable safetensors file: "
                                       f"{error}") from None
        return embedding_from_dict(tensors, path, metadata)
    if suffix in IMAGE_SUFFIXES:
        from trainers.formats.png_embedding import read_png_embedding
        return read_png_embedding(path)
    raise EmbeddingFormatError(f"{path.name}: unknown embedding suffix {path.suffix!r}; "
                               "expected .pt, .bin, .safetensors, .png or .webp")


def to_a1111_dict(emb: EmbeddingFile) -> dict[str, Any]:
    """The dict A1111 saves (SD1/SD2), or the clip_l/clip_g pair it reads for SDXL."""
    where = Path(f"{emb.name}.pt")
    if emb.is_sdxl:
        return _sdxl_vectors(emb.vectors, where)
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": _as_2d_float(emb.vectors, where, "vectors")},
        "name": emb.name,
        "step": None if emb.step is None else int(emb.step),
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
    }


def embedding_from_dict(data: Any, path: Path,
                        metadata: Mapping[str, str] | None = None) -> EmbeddingFile:
    """Recognise the A1111, SDXL, kohya and diffusers layouts of a loaded file."""
    if isinstance(data, torch.Tensor):  # diffusers accepts a bare tensor too
        data = {path.stem: data}
    if not isinstance(data, dict) or not data:
        raise EmbeddingFormatError(f"{path.name}: not an embedding: expected a dict of tensors, "
                                   f"found {type(data).__name__}")
    vectors: Vectors
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise EmbeddingFormatError(f"{path.name}: string_to_param must hold exactly one "
                                       f"tensor, found {count}")
        vectors = _as_2d_float(next(iter(params.values())), path, "string_to_param")
    elif all(key in data for key in SDXL_KEYS):
        vectors = _sdxl_vectors(data, path)
    elif "emb_params" in data:
        vectors = _as_2d_float(data["emb_params"], path, "emb_params")
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        key, tensor = next(iter(data.items()))
        vectors = _as_2d_float(tensor, path, str(key))
    else:
        keys = ", ".join(repr(k) for k in list(data)[:8])
        raise EmbeddingFormatError(
            f"{path.name}: not an embedding: expected 'string_to_param' (A1111), 'emb_params' "
            f"(kohya), 'clip_l' + 'clip_g' (SDXL) or a single token tensor (diffusers); "
            f"found keys {keys}")

    info = dict(metadata or {})
    info.update((k, v) for k, v in data.items() if not isinstance(v, torch.Tensor))
    name = info.get("name")
    return EmbeddingFile(
        name=name if isinstance(name, str) and name else path.stem,
        vectors=vectors,
        step=_optional_int(info.get("step")),
        sd_checkpoint=_optional_str(info.get("sd_checkpoint")),
        sd_checkpoint_name=_optional_str(info.get("sd_checkpoint_name")),
    )


def embedding_checksum(vectors: Vectors) -> str:
    """A1111's 4-hex checksum of the values (Embedding.checksum), so that A1111 also accepts
    the .optim sidecars Danlu writes. SDXL: clip_l then clip_g."""
    parts = [vectors[k] for k in SDXL_KEYS] if isinstance(vectors, dict) else [vectors]
    result = 0
    for part in parts:
        # float32 multiply, then truncation toward zero, exactly as A1111 computes it
        for value in (part.detach().to("cpu", torch.float32).reshape(-1) * 100).tolist():
            result = ((result * 281) ^ (int(value) * 997)) & 0xFFFFFFFF
    return f"{result & 0xFFFF:04x}"


def _as_2d_float(tensor: Any, path: Path, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise EmbeddingFormatError(f"{path.name}: {what} is a {type(tensor).__name__}, "
                                   "not a tensor")
    tensor = tensor.detach().to("cpu", torch.float32)
    if tensor.dim() == 1:
        tensor = tensor.reshape(1, -1)  # A1111 reads a 1-D tensor as `dim` vectors of size 1
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise EmbeddingFormatError(f"{path.name}: {what} has shape {list(tensor.shape)}, "
                                   "expected [n_vectors, dim]")
    return tensor.contiguous()


def _sdxl_vectors(data: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    missing = [key for key in SDXL_KEYS if key not in data]
    if missing:
        raise EmbeddingFormatError(f"{path.name}: SDXL vectors need clip_l and clip_g, "
                                   f"missing {', '.join(missing)}")
    pair = {key: _as_2d_float(data[key], path, key) for key in SDXL_KEYS}
    if pair["clip_l"].shape[0] != pair["clip_g"].shape[0]:
        raise EmbeddingFormatError(f"{path.name}: clip_l has {pair['clip_l'].shape[0]} vectors "
                                   f"but clip_g has {pair['clip_g'].shape[0]}")
    return pair


def _metadata(emb: EmbeddingFile) -> dict[str, str]:
    values = {"name": emb.name, "step": emb.step, "sd_checkpoint": emb.sd_checkpoint,
              "sd_checkpoint_name": emb.sd_checkpoint_name}
    return {key: str(value) for key, value in values.items() if value is not None}


def _optional_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
