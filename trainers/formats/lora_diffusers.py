"""A LoRA in diffusers' (peft) layout, written beside the kohya file on request.

Folder `<name>-diffusers/` holding `pytorch_lora_weights.safetensors` (the name diffusers'
`load_lora_weights(folder)` looks for), keys `unet.<module path>.lora_A.weight` /
`.lora_B.weight` and `text_encoder.text_model.<module path>.lora_A.weight` / `.lora_B.weight`
(lora_A is kohya's lora_down, lora_B its lora_up), header metadata `{"format": "pt"}`.

The diffusers/peft convention without adapter metadata is scale 1 (lora_alpha = rank), so the
kohya scale alpha / rank is folded into lora_B: the folder gives the same output as the kohya file
in every loader that reads the diffusers layout, older diffusers versions included.

A DoRA file's `dora_scale` (output axis) becomes `<key>.lora_magnitude_vector.weight`, [out] for a
Linear and [1, out, 1, 1] for a conv, from which `load_lora_weights` sets up peft's DoRA
(`use_dora`); diffusers drops `dora_scale` from a kohya file itself."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import safetensors.torch
import torch

from core.atomic import atomic_write
from trainers.formats.lora import to_precision

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FOLDER_SUFFIX = "-diffusers"


def diffusers_folder(kohya_path: str | Path) -> Path:
    """models/Lora/<name>.safetensors -> models/Lora/<name>-diffusers/"""
    kohya_path = Path(kohya_path)
    return kohya_path.with_name(kohya_path.stem + FOLDER_SUFFIX)


def _key_path(part: str, path: str, denoiser: str = "unet") -> str:
    if part.startswith("text_encoder") and not path.startswith("text_model."):
        path = f"text_model.{path}"  # transformers 5 drops the level; files keep it
    return f"{denoiser if part == 'unet' else part}.{path}"


def to_diffusers(kohya_state: Mapping[str, torch.Tensor], targets: Iterable,
                 denoiser: str = "unet") -> dict[str, torch.Tensor]:
    """kohya tensors (`<name>.lora_down/up.weight`, `<name>.alpha`, one name per target) ->
    diffusers keys, with the scale alpha / rank folded into lora_B. `targets` name each
    module's part and path; `denoiser` is the pipeline's name for it (`transformer` for Flux)."""
    state: dict[str, torch.Tensor] = {}
    for target in targets:
        down = kohya_state[f"{target.name}.lora_down.weight"].float()
        up = kohya_state[f"{target.name}.lora_up.weight"].float()
        alpha = kohya_state.get(f"{target.name}.alpha")
        rank = down.shape[0]
        scale = (float(alpha) if alpha is not None else rank) / rank
        key = _key_path(target.part, target.path, denoiser)
        state[f"{key}.lora_A.weight"] = down
        state[f"{key}.lora_B.weight"] = up * scale
        magnitude = kohya_state.get(f"{target.name}.dora_scale")
        if magnitude is not None:  # peft's shape: [out] for a Linear, [1, out, 1, 1] for a conv
            magnitude = magnitude.float().flatten()
            state[f"{key}.lora_magnitude_vector.weight"] = magnitude if down.dim() == 2 else \
                magnitude.reshape(1, -1, 1, 1)
    if not state:
        raise ValueError("no LoRA modules to write in the diffusers format")
    return state


def save_diffusers_lora(folder: str | Path, kohya_state: Mapping[str, torch.Tensor], targets,
                        precision: str = "fp32", denoiser: str = "unet") -> Path:
    """Write `<folder>/pytorch_lora_weights.safetensors` atomically; returns its path."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_precision(to_diffusers(kohya_state, targets, denoiser), precision)
    target = folder / WEIGHT_NAME
    atomic_write(target, lambda temp: safetensors.torch.save_file(tensors, str(temp),
                                                                   metadata={"format": "pt"}))
    return target
