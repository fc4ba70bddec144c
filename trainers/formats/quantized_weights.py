"""fp8 transformer files as ComfyUI users download them, read back to full precision: plain
float8 weights (`flux1-dev-fp8`), ComfyUI's legacy `*_fp8_scaled` files (`<layer>.weight` in
float8 with a `<layer>.scale_weight`, optionally `<layer>.scale_input` and a `scaled_fp8` marker
tensor) and its newer quantized layout (`<layer>.weight_scale`, `<layer>.input_scale` and a
`<layer>.comfy_quant` tensor holding the layer's format as JSON). A weight is its stored value
times its scale; the scale tensors and markers are not model weights and are dropped."""
from __future__ import annotations

import json

import torch

WEIGHT_SCALES = (".scale_weight", ".weight_scale")
SIDECARS = WEIGHT_SCALES + (".scale_input", ".input_scale", ".comfy_quant")
MARKER = "scaled_fp8"
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class QuantizedFileError(ValueError):
    pass


def is_sidecar(key: str) -> bool:
    return key.endswith(SIDECARS) or key.rsplit(".", 1)[-1] == MARKER or key == MARKER


def without_sidecars(entries: dict) -> dict:
    """The file's entries (tensors or shapes) without its scale tensors and markers."""
    return {k: v for k, v in entries.items() if not is_sidecar(k)}


def _layer_format(state: dict, stem: str) -> str | None:
    marker = state.get(stem + ".comfy_quant")
    if marker is None:
        return None
    try:
        return json.loads(bytes(marker.to(torch.uint8).flatten().tolist()).decode())["format"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise QuantizedFileError(f"{stem}.comfy_quant: not the JSON layer format ComfyUI "
                                 "writes") from None


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with every fp8 weight as float32 (times its scale, when it has one) and the
    scale tensors and markers dropped; other tensors are unchanged. A layer quantized in a
    format other than fp8 (ComfyUI's nvfp4, int8, ...) is refused by name."""
    out = {}
    for key, tensor in state.items():
        if is_sidecar(key):
            continue
        if not key.endswith(".weight"):
            out[key] = tensor
            continue
        stem = key[: -len(".weight")]
        layer_format = _layer_format(state, stem)
        if layer_format is not None and layer_format not in FP8_FORMATS:
            raise QuantizedFileError(
                f"{key}: quantized as {layer_format!r}; Danlu reads fp8 files "
                f"({', '.join(FP8_FORMATS)}): use the model's bf16 or fp8 file")
        if tensor.dtype not in FP8_DTYPES:
            out[key] = tensor
            continue
        value = tensor.to(torch.float32)
        scale = next((state[stem + s] for s in WEIGHT_SCALES if stem + s in state), None)
        if scale is not None:
            scale = scale.to(torch.float32)
            if scale.numel() > 1:  # one scale per output row
                scale = scale.reshape(-1, *[1] * (value.dim() - 1))
            value = value * scale
        out[key] = value
    return out
