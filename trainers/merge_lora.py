"""Merge kohya LoRA / LoCon files into one, each at its weight.

A layer's merged change is the weighted sum of the files' changes. Stacking the factors gives
it exactly: down = [down_1; down_2; ...], up = [w_1 * s_1 * up_1, w_2 * s_2 * up_2, ...] with
each file's scale s = alpha / rank folded in and alpha = the summed rank, so the ranks add up.
A rank > 0 then cuts each merged layer to that rank by SVD (trainers/resize_lora.py). A layer
only some files have is merged from those. DoRA files are refused (a DoRA layer's change
depends on the base weight)."""
from __future__ import annotations

from pathlib import Path

import torch

from core import events as ev
from trainers.formats.dora import has_dora
from trainers.formats.key_check import saved_file_note
from trainers.formats.lora import load_lora, save_lora
from trainers.resize_lora import DOWN, UP, derived_metadata, output_target, resize_state


def merge_states(weighted: list[tuple[dict, float]]) -> dict[str, torch.Tensor]:
    names = sorted({k[:-len(DOWN)] for state, _ in weighted for k in state if k.endswith(DOWN)})
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        downs, ups = [], []
        for state, weight in weighted:
            if name + DOWN not in state:
                continue
            down, up = state[name + DOWN].float(), state[name + UP].float()
            rank = down.shape[0]
            alpha = float(state[name + ".alpha"]) if name + ".alpha" in state else float(rank)
            downs.append(down)
            ups.append(up * (weight * alpha / rank))
        if len({d.shape[1:] for d in downs}) > 1 or len({u.shape[0] for u in ups}) > 1:
            raise ValueError(f"loras: {name} has different shapes in different files "
                             f"({', '.join(str(tuple(d.shape)) for d in downs)}); merge LoRAs "
                             "made for the same base model")
        merged[name + DOWN] = torch.cat(downs, dim=0).contiguous()
        merged[name + UP] = torch.cat(ups, dim=1).contiguous()
        merged[name + ".alpha"] = torch.tensor(float(merged[name + DOWN].shape[0]))
    return merged


def run(cfg, ctx) -> Path:
    cfg.validate()
    paths = ctx.paths
    target = output_target(paths, cfg.output_name, cfg.overwrite)
    weighted, first_meta = [], None
    for name, weight in cfg.weighted():
        ctx.emit(ev.Status(f"Reading {name}"))
        state, metadata = load_lora(paths.resolve(paths.lora / name, "loras"))
        if has_dora(state):
            raise ValueError(f"loras: {name} is a DoRA file (dora_scale): its change depends on "
                             "the base weight it is applied to, so no sum of low-rank factors "
                             "holds it; merge it into a checkpoint instead")
        weighted.append((state, weight))
        first_meta = first_meta if first_meta is not None else metadata
    merged = merge_states(weighted)
    if cfg.rank:
        merged = resize_state(merged, cfg.rank)
    ranks = sorted({v.shape[0] for k, v in merged.items() if k.endswith(DOWN)})
    listed = ", ".join(f"{name} x {weight:g}" for name, weight in cfg.weighted())
    metadata = derived_metadata(first_meta or {}, target, max(ranks), f"merged: {listed}")
    save_lora(target, merged, metadata, precision=cfg.save_precision)
    ctx.emit(ev.Saved(step=0, path=str(target), kind="final"))
    ctx.emit(ev.Finished(step=0, path=str(target), message=(
        f"Merged {listed} into {len(merged) // 3} layers of rank "
        f"{'/'.join(map(str, ranks))}: {target}. {saved_file_note(target)}")))
    return target
