"""Textual-inversion vectors bundled inside a LoRA file (pivotal tuning), in the key layout
A1111's built-in Lora extension reads (`extensions-builtin/Lora/networks.py`, `bundle_emb`):

  SD 1.x / 2.x: `bundle_emb.<name>.string_to_param.*`  [n_vectors, width]
  SDXL:         `bundle_emb.<name>.clip_l` [n, 768] and `bundle_emb.<name>.clip_g` [n, 1280]

A1111 splits the key at its first two dots, so `<name>` holds no dot; the name is the word that
calls the vectors in a prompt once the LoRA is loaded. The header's `ss_bundled_embeddings`
names them ({name: {"vectors": n, ...}}, JSON). ComfyUI ignores these keys ("lora key not
loaded") and diffusers' load_lora_weights refuses a file that has them; the separate embedding
file (trainers/checkpoint_use.py) serves both."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import safetensors
import torch

PREFIX = "bundle_emb."
METADATA_KEY = "ss_bundled_embeddings"
SDXL_KEYS = ("clip_l", "clip_g")
A1111_PARAM = "string_to_param.*"

Vectors = torch.Tensor | dict[str, torch.Tensor]


def bundle_tensors(name: str, vectors: Vectors) -> dict[str, torch.Tensor]:
    """The file's keys for one embedding: string_to_param.* for one tensor, clip_l / clip_g
    for SDXL's pair."""
    if not name or "." in name:
        raise ValueError(f"a bundled embedding's name must be non-empty without dots: {name!r}")
    if isinstance(vectors, dict):
        return {f"{PREFIX}{name}.{key}": vectors[key] for key in SDXL_KEYS}
    return {f"{PREFIX}{name}.{A1111_PARAM}": vectors}


def split_bundle(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                             dict[str, Vectors]]:
    """(the adapter's own tensors, {name: vectors}) of a LoRA state dict. Vectors are a tensor
    (string_to_param) or {"clip_l", "clip_g"} (SDXL), as A1111 builds them from the keys."""
    adapter, found = {}, {}
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            adapter[key] = tensor
            continue
        name, _, part = key[len(PREFIX):].partition(".")
        found.setdefault(name, {})[part] = tensor
    bundled: dict[str, Vectors] = {}
    for name, parts in found.items():
        params = [t for part, t in parts.items() if part.split(".")[0] == "string_to_param"]
        if len(params) == 1:
            bundled[name] = params[0]
        elif all(key in parts for key in SDXL_KEYS):
            bundled[name] = {key: parts[key] for key in SDXL_KEYS}
        else:
            raise ValueError(f"bundled embedding {name!r} has keys {sorted(parts)}; expected "
                             f"one string_to_param.* or clip_l + clip_g")
    return adapter, bundled


def bundle_state(bundled: Mapping[str, Vectors]) -> dict[str, torch.Tensor]:
    """The file keys of several embeddings ({name: vectors}, as read_bundled returns)."""
    return {key: tensor for name, vectors in bundled.items()
            for key, tensor in bundle_tensors(name, vectors).items()}


def read_bundled(path: str | Path) -> dict[str, Vectors]:
    """The embeddings bundled in a LoRA .safetensors file (only their tensors are read)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(PREFIX)}
    return split_bundle(state)[1]


def bundle_metadata(entries: Mapping[str, Mapping]) -> dict[str, str]:
    """`ss_bundled_embeddings`: {name: what is known of it (vectors, init text, ...)}."""
    return {METADATA_KEY: json.dumps({name: dict(info) for name, info in entries.items()})}
