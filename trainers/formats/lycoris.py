"""LyCORIS LoHa / LoKr files in the key layout A1111's built-in Lora extension, ComfyUI and
LyCORIS itself load (names are kohya's: `lora_unet_*`, `lora_te_*`, `lora_te1_*` / `lora_te2_*`).

LoHa (`algo = "loha"`), per module `<name>`:
  `hada_w1_a` [out, r], `hada_w1_b` [r, in], `hada_w2_a` [out, r], `hada_w2_b` [r, in],
  `alpha` (0-d); delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r. A conv's `in` is
  in_channels * kh * kw and the delta is reshaped to the conv weight (no Tucker `hada_t1/t2`).
LoKr (`algo = "lokr"`):
  `lokr_w1` [a, c] (or `lokr_w1_a` [a, r] @ `lokr_w1_b` [r, c]), `lokr_w2` [b, d] (or [b, d, kh,
  kw] for a conv; or `lokr_w2_a` [b, r] @ `lokr_w2_b` [r, d * kh * kw]), `alpha`;
  delta = kron(w1, w2) * alpha / r, where r is the rank of a factored part (w2_b's rows, else
  w1_b's); with both parts full matrices there is no scale (LyCORIS then stores alpha = rank).

Header metadata: kohya's `ss_*` keys with `ss_network_module = "lycoris.kohya"` and
`ss_network_args` = {"algo": ..., "conv_dim", "conv_alpha", LoKr's "factor"} as strings.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import safetensors
import safetensors.torch
import torch

from core.atomic import atomic_write
from trainers.formats.bundled_embeddings import PREFIX as BUNDLE_PREFIX, split_bundle
from trainers.formats.lora import (LoraFormatError, SUFFIX, load_lora, lora_hashes,
                                   precision_dtype, to_precision)
from trainers.formats.save_check import check_savable

NETWORK_MODULE = "lycoris.kohya"
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
ALGOS = {"loha": LOHA_KEYS, "lokr": LOKR_KEYS}


def algo_of(state: Mapping[str, torch.Tensor]) -> str | None:
    """"loha" / "lokr" when the keys are LyCORIS ones, None for anything else (kohya LoRA)."""
    suffixes = {key.split(".", 1)[1] for key in state if "." in key}
    found = [algo for algo, keys in ALGOS.items() if suffixes & set(keys)]
    if len(found) > 1:
        raise LoraFormatError("the file mixes LoHa and LoKr modules")
    return found[0] if found else None


def module_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({key.split(".", 1)[0] for key in state})


def _alpha(state, name: str) -> float | None:
    value = state.get(f"{name}.alpha")
    return None if value is None else float(value.float().reshape(()))


def lycoris_delta(state: Mapping[str, torch.Tensor], name: str,
                  shape: torch.Size | tuple[int, ...] | None = None,
                  multiplier: float = 1.0) -> torch.Tensor:
    """The weight delta module `name` of a LoHa / LoKr state dict applies (float32), reshaped
    to `shape` (the base weight's) when given, by the formulas in this module's docstring."""
    get = (lambda suffix: state.get(f"{name}.{suffix}"))
    alpha = _alpha(state, name)
    if get("hada_w1_a") is not None:
        w1a, w1b, w2a, w2b = (get(k).float() for k in LOHA_KEYS)
        rank = w1b.shape[0]
        delta = (w1a @ w1b) * (w2a @ w2b) * ((alpha if alpha else rank) / rank)
    elif get("lokr_w1") is not None or get("lokr_w1_a") is not None:
        w1 = get("lokr_w1").float() if get("lokr_w1") is not None else \
            get("lokr_w1_a").float() @ get("lokr_w1_b").float()
        w2 = get("lokr_w2").float() if get("lokr_w2") is not None else \
            get("lokr_w2_a").float() @ get("lokr_w2_b").float()
        factored = get("lokr_w2_b") if get("lokr_w2_b") is not None else get("lokr_w1_b")
        scale = 1.0
        if factored is not None:
            rank = factored.shape[0]
            scale = (alpha if alpha else rank) / rank
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2) * scale
    else:
        raise LoraFormatError(f"{name}: neither LoHa nor LoKr tensors")
    delta = delta * multiplier
    return delta.reshape(shape) if shape is not None else delta


# ---- save / load --------------------------------------------------------------------------
def _check_state(state: Mapping[str, torch.Tensor], where: str) -> str:
    if not state:
        raise ValueError(f"{where}: no LyCORIS tensors to save")
    algo = algo_of(state)
    if algo is None:
        raise ValueError(f"{where}: no LoHa / LoKr tensors")
    for name in module_names(state):
        problem = _module_problem(state, name, algo)
        if problem:
            raise ValueError(f"{where}: {name} {problem}")
    return algo


def _module_problem(state, name: str, algo: str) -> str | None:
    has = (lambda suffix: f"{name}.{suffix}" in state)
    if algo == "loha":
        missing = [k for k in LOHA_KEYS if not has(k)]
        return f"has no {', '.join(missing)}" if missing else None
    for part in ("w1", "w2"):
        if not (has(f"lokr_{part}") or (has(f"lokr_{part}_a") and has(f"lokr_{part}_b"))):
            return f"has no lokr_{part} (nor lokr_{part}_a and lokr_{part}_b)"
    return None


def save_lycoris(path: str | Path, state: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None,
                 precision: str | torch.dtype | None = None) -> dict[str, str]:
    """Write a LoHa / LoKr file atomically (as trainers.formats.lora.save_lora: the same
    precision rule and sshs_* hashes); returns the metadata written."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise ValueError(f"{path.name}: LyCORIS files are written as {SUFFIX}")
    _check_state(split_bundle(state)[0], path.name)  # bundled embeddings may ride along
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{path.name}: metadata {key!r} must be a string")
    check_savable(path.name, state, precision_dtype(precision) if precision is not None else None)
    tensors = to_precision(state, precision) if precision is not None else \
        {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = lora_hashes(tensors, meta)
    atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, str(temp), metadata=meta))
    return meta


def load_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya LoRA or a LyCORIS LoHa / LoKr file -> (state dict, metadata); LoraFormatError
    naming the file for anything else."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX and path.is_file():
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
                keys = [key for key in handle.keys() if not key.startswith(BUNDLE_PREFIX)]
                if algo_of(dict.fromkeys(keys)) is not None:
                    metadata = dict(handle.metadata() or {})
                    state = {key: handle.get_tensor(key) for key in keys}
                    try:
                        _check_state(state, str(path))
                    except ValueError as error:
                        raise LoraFormatError(str(error)) from None
                    return state, metadata
        except LoraFormatError:
            raise
        except Exception:
            pass  # load_lora names the problem
    return load_lora(path)


# ---- metadata -----------------------------------------------------------------------------
def network_args(algo: str, conv_dim: int = 0, conv_alpha: float = 1.0,
                 factor: int = -1, dora_wd: bool = False,
                 wd_on_output: bool = True) -> dict[str, str]:
    """`ss_network_args` as kohya records LyCORIS's command-line args (all strings); DoRA is
    `dora_wd` with the axis of its norm, `wd_on_output`."""
    def text(value) -> str:
        value = float(value)
        return str(int(value)) if value.is_integer() else str(value)
    args = {}
    if conv_dim:
        args["conv_dim"] = str(int(conv_dim))
        args["conv_alpha"] = text(conv_alpha)
    args["algo"] = algo
    if algo == "lokr":
        args["factor"] = str(int(factor))
    if dora_wd:
        args["dora_wd"] = "True"
        args["wd_on_output"] = str(bool(wd_on_output))
    return args


def lycoris_metadata(metadata: Mapping[str, str], algo: str, conv_dim: int = 0,
                     conv_alpha: float = 1.0, factor: int = -1,
                     dora_wd: bool = False, wd_on_output: bool = True) -> dict[str, str]:
    """kohya LoRA metadata (trainers.formats.lora.lora_metadata) made LyCORIS's."""
    meta = dict(metadata)
    meta["ss_network_module"] = NETWORK_MODULE
    meta["ss_network_args"] = json.dumps(network_args(algo, conv_dim, conv_alpha, factor,
                                                      dora_wd, wd_on_output))
    return meta
