"""A fully fine-tuned flow-family transformer written as one transformer-only `.safetensors` in
the family's original layout (BFL's names for Flux.1, Chroma and Flux.2, Z-Image's own,
diffusers' names for Qwen-Image; trainers/formats/transformer_layouts.py): the file ComfyUI's
diffusion-model loader reads and trainers/transformer_file.py loads back. No prefix is written,
as in the released files (`flux1-dev.safetensors`, Chroma1-HD, `qwen_image_bf16`)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch

from core.atomic import atomic_write
from trainers.formats.save_check import check_savable

SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def transformer_state(transformer, layout) -> dict[str, torch.Tensor]:
    """The transformer's weights under the original layout's names (as the module holds them)."""
    return layout.to_original(transformer.state_dict())


def save_transformer_file(path: str | Path, transformer, layout, dtype: torch.dtype,
                          metadata: Mapping[str, str]) -> Path:
    """Write the transformer in `layout` (the family's `transformer_file` hook), floating
    tensors cast to `dtype`, atomically; nan/inf or overflowing weights are refused."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: a transformer file is written as .safetensors")
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of float16, bfloat16, float32")
    source = transformer_state(transformer, layout)
    check_savable(path.name, source, dtype)
    tensors = {key: value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype)
               .contiguous() for key, value in source.items()}
    header = {str(k): str(v) for k, v in metadata.items()}
    atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, str(temp),
                                                                metadata=header))
    return path
