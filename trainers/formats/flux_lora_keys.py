"""kohya sd-scripts Flux.1 LoRA names for diffusers' FluxTransformer2DModel Linears.

kohya names follow BFL's original layout (`double_blocks.N.img_attn.qkv` ->
`lora_unet_double_blocks_N_img_attn_qkv`), which ComfyUI, Forge and diffusers'
`FluxPipeline.load_lora_weights` read. BFL fuses q/k/v (double blocks) and q/k/v/mlp
(single blocks' `linear1`) into one Linear where diffusers has one per projection, so a
diffusers module inside a fused layer gets the internal name `<fused name>@<slot index>`.
`fuse_state` turns per-slot factors into one fused module whose delta is exactly the slots'
deltas stacked (block-diagonal lora_up); `split_state` reads that back, and also kohya's own
fused files, which share one lora_down across the slots.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

SLOT = "@"
BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")

PREFIX = "lora_unet_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
_SUFFIXES = (DOWN, UP, ALPHA)

# diffusers path inside a block -> (BFL name inside the block, slot index or None)
_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None),
    "ff.net.2": ("img_mlp_2", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None),
    "ff_context.net.2": ("txt_mlp_2", None),
    "norm1.linear": ("img_mod_lin", None),
    "norm1_context.linear": ("txt_mod_lin", None),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation_lin", None),
}
# norm_out.linear (BFL final_layer.adaLN_modulation.1) is left out: BFL orders its output
# halves shift, scale and diffusers scale, shift, so a LoRA on it is not a renaming.
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
}
# Slot counts of the fused layers, so that a group missing its last slot is caught too.
_ARITY = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}
_BLOCK = re.compile(r"(single_)?transformer_blocks\.(\d+)\.(.+)")


def kohya_name(path: str) -> str | None:
    """The internal kohya name of a diffusers module path (`<fused>@<slot>` for a slot of a
    fused BFL layer), or None when kohya's Flux LoRA has no name for it."""
    match = _BLOCK.fullmatch(path)
    if match is None:
        bfl = _TOP.get(path)
        return None if bfl is None else PREFIX + bfl
    single, index, rest = match.groups()
    entry = (_SINGLE if single else _DOUBLE).get(rest)
    if entry is None:
        return None
    bfl, slot = entry
    name = f"{PREFIX}{'single' if single else 'double'}_blocks_{int(index)}_{bfl}"
    return name if slot is None else f"{name}{SLOT}{slot}"


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[:-len(suffix)], suffix
    return None


def _alpha_value(state: Mapping[str, torch.Tensor], name: str, rank: int) -> float:
    alpha = state.get(name + ALPHA)
    return float(rank) if alpha is None else float(alpha)


def fuse_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Internal state (names possibly `X@i`) -> file state: each group `X@0..X@n-1` becomes
    one `X` with lora_down = the slots' downs stacked, lora_up = their ups block-diagonal and
    alpha = the sum of the slots' alphas (so alpha / rank is the slots' common ratio)."""
    groups: dict[str, dict[int, str]] = {}
    order: list[tuple[str, str | None]] = []  # (key, None) passes through; (X, "group") fuses
    for key in state:
        parts = _split_key(key)
        name = parts[0] if parts else key.split(".", 1)[0]
        if SLOT not in name:
            order.append((key, None))
            continue
        base, _, slot = name.rpartition(SLOT)
        if not slot.isdigit():
            raise ValueError(f"{key}: slot {slot!r} is not a number")
        if parts is None:
            raise ValueError(f"{key}: a slot of {base} may only hold lora_down, lora_up and alpha")
        if base not in groups:
            groups[base] = {}
            order.append((base, "group"))
        groups[base][int(slot)] = name

    out: dict[str, torch.Tensor] = {}
    for key, kind in order:
        if kind is None:
            out[key] = state[key]
            continue
        fused = _fuse_group(state, key, groups[key])
        clash = [k for k in fused if k in state]
        if clash:
            raise ValueError(f"{key}: the state holds both the fused module and its slots")
        out.update(fused)
    return out


def _fuse_group(state: Mapping[str, torch.Tensor], base: str,
                slots: dict[int, str]) -> dict[str, torch.Tensor]:
    arity = next((n for bfl, n in _ARITY.items() if base.endswith("_" + bfl)), 0)
    if arity and max(slots) >= arity:
        raise ValueError(f"{base}: has {arity} slots, not slot {max(slots)}")
    count = max(arity, max(slots) + 1)
    missing = [i for i in range(count) if i not in slots]
    if missing:
        raise ValueError(f"{base}: slot(s) {missing} missing (has {sorted(slots)})")
    names = [slots[i] for i in range(count)]
    downs, ups = [], []
    for name in names:
        if name + DOWN not in state or name + UP not in state:
            raise ValueError(f"{base}: {name} needs both lora_down and lora_up")
        downs.append(state[name + DOWN])
        ups.append(state[name + UP])
    if any(d.ndim != 2 or u.ndim != 2 for d, u in zip(downs, ups)):
        raise ValueError(f"{base}: fused slots must be Linear LoRAs (2-d factors)")
    if len({d.shape[1] for d in downs}) > 1:
        raise ValueError(f"{base}: slots have different input sizes {[d.shape[1] for d in downs]}")
    if len({t.dtype for t in downs + ups}) > 1:
        raise ValueError(f"{base}: slots have different dtypes")
    if any(d.shape[0] != u.shape[1] for d, u in zip(downs, ups)):
        raise ValueError(f"{base}: a slot's lora_up and lora_down ranks differ")

    ranks = [d.shape[0] for d in downs]
    alphas = [_alpha_value(state, name, r) for name, r in zip(names, ranks)]
    ratios = [a / r for a, r in zip(alphas, ranks)]
    if any(not math.isclose(q, ratios[0], rel_tol=1e-6) for q in ratios):
        raise ValueError(f"{base}: slots have different alpha / rank ({ratios}); "
                         "they cannot share one fused alpha")

    down = torch.cat(downs, dim=0)
    up = ups[0].new_zeros(sum(u.shape[0] for u in ups), sum(ranks))
    row = col = 0
    for u in ups:
        up[row:row + u.shape[0], col:col + u.shape[1]] = u
        row, col = row + u.shape[0], col + u.shape[1]
    fused = {base + DOWN: down, base + UP: up}
    present = [state[name + ALPHA] for name in names if name + ALPHA in state]
    if present:
        fused[base + ALPHA] = torch.tensor(sum(alphas), dtype=present[0].dtype,
                                        device=present[0].device)
    return fused


def split_state(file_state: Mapping[str, torch.Tensor],
                slots: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """File state -> internal state: each fused name X in `slots` (X -> each slot's output
    size) present in the file becomes `X@0..X@n-1`. A block-diagonal lora_up with n*r rows in
    lora_down (what fuse_state writes) gives each slot its own rank-r factors and alpha / n;
    otherwise (kohya's files: one lora_down shared by the slots) each slot gets a copy of the
    down, its rows of the up and the file's alpha. Other keys pass through."""
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key, value in file_state.items():
        parts = _split_key(key)
        name = parts[0] if parts else key.split(".", 1)[0]
        if name not in slots:
            out[key] = value
            continue
        if name in done:
            continue
        done.add(name)
        if parts is None:
            raise ValueError(f"{key}: a fused LoRA module may only hold lora_down, lora_up and alpha")
        out.update(_split_one(file_state, name, tuple(slots[name])))
    return out


def _split_one(state: Mapping[str, torch.Tensor], name: str,
               sizes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    if name + DOWN not in state or name + UP not in state:
        raise ValueError(f"{name}: needs both lora_down and lora_up")
    down, up = state[name + DOWN], state[name + UP]
    if down.ndim != 2 or up.ndim != 2:
        raise ValueError(f"{name}: fused modules must be Linear LoRAs (2-d factors)")
    if up.shape[0] != sum(sizes):
        raise ValueError(f"{name}: lora_up has {up.shape[0]} rows, but the slots "
                         f"{tuple(sizes)} add up to {sum(sizes)}")
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"{name}: lora_up and lora_down ranks differ")
    alpha = state.get(name + ALPHA)
    n, rank = len(sizes), down.shape[0]
    starts = [sum(sizes[:i]) for i in range(n)]

    out: dict[str, torch.Tensor] = {}
    if rank % n == 0 and _block_diagonal(up, sizes, rank // n):
        r = rank // n
        for i, (start, size) in enumerate(zip(starts, sizes)):
            slot = f"{name}{SLOT}{i}"
            out[slot + DOWN] = down[i * r:(i + 1) * r].clone()
            out[slot + UP] = up[start:start + size, i * r:(i + 1) * r].clone()
            if alpha is not None:
                out[slot + ALPHA] = torch.tensor(float(alpha) / n, dtype=alpha.dtype)
    else:
        for i, (start, size) in enumerate(zip(starts, sizes)):
            slot = f"{name}{SLOT}{i}"
            out[slot + DOWN] = down.clone()
            out[slot + UP] = up[start:start + size].clone()
            if alpha is not None:
                out[slot + ALPHA] = alpha.clone()
    return out


def _block_diagonal(up: torch.Tensor, sizes: tuple[int, ...], r: int) -> bool:
    start = 0
    for i, size in enumerate(sizes):
        rows = up[start:start + size]
        if rows[:, :i * r].any() or rows[:, (i + 1) * r:].any():
            return False
        start += size
    return True


def delta_of(state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """alpha / rank * up @ down of one module (file or internal name), float32."""
    down = state[name + DOWN].float()
    up = state[name + UP].float()
    rank = down.shape[0]
    scale = _alpha_value(state, name, rank) / rank
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return (scale * delta).reshape(up.shape[0], *down.shape[1:])
