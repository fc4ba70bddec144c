"""A1111 hypernetwork `.pt` files.

Layout (what A1111's Hypernetwork.save writes): for every enabled context width an int key ->
(state_dict_k, state_dict_v), the state dicts of two HypernetworkModule (keys `linear.{i}.*`,
see trainers/hypernetwork_net.py for the indices), then `step`, `name`, `layer_structure`,
`activation_func`, `is_layer_norm`, `weight_initialization`, `sd_checkpoint`,
`sd_checkpoint_name`, `activate_output`, `use_dropout`, `dropout_structure`,
`last_layer_dropout`, `optional_info`.

Reading follows A1111's defaults for older files: no `layer_structure` means [1, 2, 1], no
`activation_func` means none ("linear"), no `activate_output` means True, no
`dropout_structure` means 0.3 after the hidden layers when `use_dropout` (the last hidden one
only with `last_layer_dropout`), and the oldest files' `linear1`/`linear2` keys are
`linear.0`/`linear.1`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from core.config import ConfigError
from trainers.formats.safe_load import NotATorchFileError, safe_torch_load, save_torch_legacy
from trainers.formats.save_check import check_savable
from trainers.hypernetwork_net import (WEIGHT_INITS, Hypernetwork, HypernetworkSpec,
                                       default_dropout_structure)

SUFFIX = ".pt"  # A1111 lists only *.pt files in models/hypernetworks
OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
            "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


class HypernetworkFormatError(ValueError):
    """A file that is not a readable hypernetwork; the message names the file."""


def to_a1111_dict(net: Hypernetwork) -> dict[Any, Any]:
    """The dict A1111's Hypernetwork.save writes, in the same key order."""
    spec = net.spec
    dropout = spec.dropout_values()
    data: dict[Any, Any] = {}
    for size, (module_k, module_v) in net.layers.items():
        data[int(size)] = (_float32_state(module_k), _float32_state(module_v))
    data.update({
        "step": int(spec.step),
        "name": spec.name,
        "layer_structure": [float(v) for v in spec.layer_structure],
        "activation_func": spec.activation_func,
        "is_layer_norm": bool(spec.add_layer_norm),
        "weight_initialization": spec.weight_initialization,
        "sd_checkpoint": spec.sd_checkpoint,
        "sd_checkpoint_name": spec.sd_checkpoint_name,
        "activate_output": bool(spec.activate_output),
        "use_dropout": bool(spec.use_dropout or any(dropout)),
        "dropout_structure": dropout,
        "last_layer_dropout": bool(dropout[-2] != 0),
        "optional_info": spec.optional_info or None,
    })
    return data


def _float32_state(module: torch.nn.Module) -> OrderedDict:
    """The module's state dict on the CPU in float32, as A1111 trains and saves them."""
    return OrderedDict((key, value.detach().to("cpu", torch.float32)
                        if value.is_floating_point() else value.detach().cpu())
                       for key, value in module.state_dict().items())


def save_hypernetwork(path: str | Path, net: Hypernetwork) -> None:
    """Write `net` as an A1111 `.pt` (legacy torch format, atomically)."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise ValueError(f"{path.name}: save hypernetworks as .pt; A1111 lists only .pt files")
    data = to_a1111_dict(net)
    check_savable(path.name, {f"{size}.{half}.{key}": value
                              for size in data if type(size) is int
                              for half, state in enumerate(data[size])
                              for key, value in state.items()})
    save_torch_legacy(data, path)


def load_hypernetwork(path: str | Path) -> Hypernetwork:
    """Read an A1111 hypernetwork file of any version, in eval mode.

    Raises HypernetworkFormatError (naming the file) for anything that is not a hypernetwork,
    and trainers.formats.safe_load.UnsafeFileError for a pickle holding arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise HypernetworkFormatError(f"{path}: no such file")
    try:
        data = safe_torch_load(path)
    except NotATorchFileError as error:
        raise HypernetworkFormatError(f"{path.name}: not a hypernetwork: {error}") from None
    return hypernetwork_from_dict(data, path)


def hypernetwork_from_dict(data: Any, path: str | Path = "<dict>") -> Hypernetwork:
    path = Path(path)
    if not isinstance(data, Mapping):
        raise HypernetworkFormatError(f"{path.name}: not a hypernetwork: it holds a "
                                      f"{type(data).__name__}, not a dict")
    sizes = [key for key in data if type(key) is int]
    if not sizes:
        raise HypernetworkFormatError(f"{path.name}: not a hypernetwork: {_why_no_layers(data)}")
    spec = _spec_from(data, sizes, path)
    try:
        net = Hypernetwork(spec, init_weights=False, strict=False)
    except ConfigError as error:
        raise HypernetworkFormatError(f"{path.name}: bad hypernetwork settings: {error}") from None
    for size in sizes:
        pair = data[size]
        if not isinstance(pair, (list, tuple)) or len(pair) < 2 or \
                not all(isinstance(part, Mapping) for part in pair[:2]):
            raise HypernetworkFormatError(f"{path.name}: size {size} holds a "
                                          f"{type(pair).__name__}, not a (key, value) pair of "
                                          "state dicts")
        for which, module, state in zip(("key", "value"), net.layers[size], pair[:2]):
            try:
                module.load_state_dict(_fix_old_keys(state))
            except (RuntimeError, TypeError) as error:
                detail = str(error).strip().splitlines()
                raise HypernetworkFormatError(
                    f"{path.name}: the {which} module of size {size} does not match the file's "
                    f"settings (layer_structure {spec.layer_structure}, activation "
                    f"{spec.activation_func}, layer norm {spec.add_layer_norm}, activate_output "
                    f"{spec.activate_output}, dropout {spec.dropout_structure}): "
                    f"{' '.join(d.strip() for d in detail[:3])}") from None
    return net.eval()


def _spec_from(data: Mapping, sizes: list[int], path: Path) -> HypernetworkSpec:
    layer_structure = data.get("layer_structure", [1, 2, 1])
    if isinstance(layer_structure, tuple):
        layer_structure = list(layer_structure)
    dropout = data.get("dropout_structure")
    if isinstance(dropout, tuple):
        dropout = list(dropout)
    use_dropout = True if isinstance(dropout, list) and any(dropout) else \
        bool(data.get("use_dropout", False))
    last_layer_dropout = bool(data.get("last_layer_dropout", False))
    if dropout is None and isinstance(layer_structure, list):
        dropout = default_dropout_structure(layer_structure, use_dropout, last_layer_dropout)
    weight_init = data.get("weight_initialization", "Normal")
    return HypernetworkSpec(
        name=_optional_str(data.get("name")) or path.stem,
        sizes=list(sizes),
        layer_structure=layer_structure,
        activation_func=data.get("activation_func") or "linear",
        # only used to initialise new weights, so A1111 accepts any value here
        weight_initialization=weight_init if weight_init in WEIGHT_INITS else "Normal",
        add_layer_norm=bool(data.get("is_layer_norm", False)),
        use_dropout=use_dropout,
        dropout_structure=dropout,
        activate_output=bool(data.get("activate_output", True)),
        last_layer_dropout=last_layer_dropout,
        step=_int_or_zero(data.get("step")),
        sd_checkpoint=_optional_str(data.get("sd_checkpoint")),
        sd_checkpoint_name=_optional_str(data.get("sd_checkpoint_name")),
        optional_info=_optional_str(data.get("optional_info")),
    )


def _why_no_layers(data: Mapping) -> str:
    keys = list(data)
    if "string_to_param" in data or "emb_params" in data:
        return "it is a textual-inversion embedding (put it in embeddings/)"
    if any(isinstance(k, str) and k.startswith(("lora_", "lora_unet", "lora_te")) for k in keys):
        return "it is a LoRA (put it in models/Lora)"
    if "state_dict" in data or any(isinstance(k, str) and k.startswith("model.diffusion_model")
                                   for k in keys):
        return "it is a model checkpoint"
    digits = [k for k in keys if isinstance(k, str) and k.isdigit()]
    if digits:
        return (f"its size keys are text ({', '.join(map(repr, digits[:5]))}), not whole "
                "numbers; A1111 ignores such keys, so the file would do nothing there")
    shown = ", ".join(map(repr, keys[:8])) + (", ..." if len(keys) > 8 else "")
    return ("it has no layers (a hypernetwork has whole-number keys such as 768 holding "
            f"(key, value) state dicts); found keys: {shown or 'none'}")


def _fix_old_keys(state: Mapping) -> dict:
    return {OLD_KEYS.get(key, key): value for key, value in state.items()}


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int_or_zero(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def hypernetwork_checksum(net: Hypernetwork) -> str:
    """10 hex of a sha256 over the weights (names, shapes and values): changes whenever the
    trained values change, independent of how the file is written."""
    digest = hashlib.sha256()
    for size in sorted(net.layers):
        for which, module in zip("kv", net.layers[size]):
            for key, tensor in module.state_dict().items():
                values = tensor.detach().to("cpu", torch.float32).contiguous()
                digest.update(f"{size}.{which}.{key}:{tuple(values.shape)};".encode())
                digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:10]


def file_shorthash(path: str | Path) -> str:
    """A1111's Hypernetwork.shorthash(): the first 10 hex of the file's sha256. A1111 keeps a
    `.optim` sidecar only when its "hash" equals this, so use it to pair sidecars that both
    A1111 and Danlu accept (compute it after the file is written)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]
