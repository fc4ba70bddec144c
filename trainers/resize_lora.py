"""Resize a kohya LoRA / LoCon file to a lower rank by SVD of each layer's weight change.

Each layer's change is W = up @ down * alpha / rank (a LoCon convolution's down flattened to
[rank, in * k * k]). Its best rank-r approximation, U S Vh truncated, is written back as
up = U * S, down = Vh with alpha = r, so the new file's scale is 1 and its change is that
approximation; a layer whose rank is already r or lower keeps its rank and its change.
`conv_rank` 0 gives convolutions the same rank as linear layers."""
from __future__ import annotations

from pathlib import Path

import torch

from core import events as ev
from trainers.formats.lora import load_lora, save_lora

DOWN, UP = ".lora_down.weight", ".lora_up.weight"


def layer_delta(state: dict, name: str) -> torch.Tensor:
    """The layer's weight change as a matrix [out, in * kernel]."""
    down, up = state[name + DOWN].float(), state[name + UP].float()
    rank = down.shape[0]
    alpha = float(state[name + ".alpha"]) if name + ".alpha" in state else float(rank)
    return (up.flatten(1) @ down.flatten(1)) * (alpha / rank)


def resize_layer(state: dict, name: str, rank: int) -> dict[str, torch.Tensor]:
    down = state[name + DOWN]
    delta = layer_delta(state, name)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = max(1, min(rank, down.shape[0], int(s.shape[0])))
    new_down = vh[:keep].reshape(keep, *down.shape[1:])
    new_up = (u[:, :keep] * s[:keep]).reshape(delta.shape[0], keep, *([1] * (down.dim() - 2)))
    return {name + DOWN: new_down.contiguous(), name + UP: new_up.contiguous(),
            name + ".alpha": torch.tensor(float(keep))}


def resize_state(state: dict, rank: int, conv_rank: int = 0) -> dict[str, torch.Tensor]:
    names = sorted(k[:-len(DOWN)] for k in state if k.endswith(DOWN))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        is_conv = state[name + DOWN].dim() == 4 and state[name + DOWN].shape[-1] > 1
        out.update(resize_layer(state, name, (conv_rank or rank) if is_conv else rank))
    return out


def output_target(paths, output_name: str, overwrite: bool) -> Path:
    """models/Lora/<output_name>.safetensors; an existing file only with overwrite."""
    target = paths.lora / f"{output_name.strip()}.safetensors"
    if target.exists() and not overwrite:
        raise FileExistsError(f"output_name: {target.name} exists in {paths.lora}; tick "
                              "'Overwrite' to replace it")
    return target


def derived_metadata(source: dict, target: Path, rank: int, comment: str) -> dict[str, str]:
    """A source file's metadata for a file made from it: its new name, rank and comment (the
    hashes are written anew by save_lora)."""
    metadata = {k: v for k, v in source.items() if not k.startswith("sshs_")}
    metadata.update({"ss_network_dim": str(rank), "ss_network_alpha": str(float(rank)),
                     "ss_output_name": target.stem, "ss_training_comment": comment})
    if "modelspec.title" in metadata:
        metadata["modelspec.title"] = target.stem
    return metadata


def run(cfg, ctx) -> Path:
    cfg.validate()
    paths = ctx.paths
    source = paths.resolve(paths.lora / cfg.lora.strip(), "lora")
    target = output_target(paths, cfg.output_name, cfg.overwrite)
    ctx.emit(ev.Status(f"Reading {source.name}"))
    state, metadata = load_lora(source)
    old = {state[k].shape[0] for k in state if k.endswith(DOWN)}
    resized = resize_state(state, cfg.rank, cfg.conv_rank)
    kept = sum(float(layer_delta(resized, n).norm() ** 2) for n in _names(resized))
    total = sum(float(layer_delta(state, n).norm() ** 2) for n in _names(state))
    metadata = derived_metadata(metadata, target, cfg.rank, (
        f"resized from {source.name} (rank {'/'.join(map(str, sorted(old)))}) to rank {cfg.rank}"))
    save_lora(target, resized, metadata, precision=cfg.save_precision)
    share = 100.0 * kept / total if total else 100.0
    ctx.emit(ev.Saved(step=0, path=str(target), kind="final"))
    ctx.emit(ev.Finished(step=0, path=str(target), message=(
        f"Resized {source.name} to rank {cfg.rank}: {len(_names(resized))} layers, "
        f"{share:.1f}% of its weight change kept (Frobenius), saved to {target}")))
    return target


def _names(state: dict) -> list[str]:
    return [k[:-len(DOWN)] for k in state if k.endswith(DOWN)]
