"""One weight at a time from an original-layout `.safetensors` checkpoint, asked for by its
diffusers module path (`unet` / `text_encoder` / `text_encoder_2` and e.g.
`down_blocks.0.attentions.0.proj_in`), without building the model: `safe_open` reads only the
bytes of that tensor (for OpenCLIP's fused q/k/v, only its third of `attn.in_proj_weight`).

Extract LoRA reads the fine-tuned checkpoint this way, so only the base model is ever whole in
memory. The names are the inverse of trainers/formats/sd_checkpoint.py's writer (SD 1.x, SD 2.x,
SDXL); a file of another family, a `.ckpt` or a diffusers folder gives None from `open_checkpoint`
and is loaded as a model instead.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from trainers.formats import sd_checkpoint as layout

# (family, part) -> (CLIP naming kind, prefix in the file)
TEXT_LAYOUTS = {
    ("sd1", "text_encoder"): ("clip", layout.SD1_TEXT_PREFIX),
    ("sd2", "text_encoder"): ("openclip", layout.SD2_TEXT_PREFIX),
    ("sdxl", "text_encoder"): ("clip", layout.SDXL_TEXT_PREFIX),
    ("sdxl", "text_encoder_2"): ("openclip", layout.SDXL_TEXT_2_PREFIX),
}
QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


class CheckpointWeights:
    """An open single file; `weight(part, path, shape)` -> that module's fp32 weight."""

    def __init__(self, path: Path, family: str, unet_config):
        self.path, self.family, self.unet_config = Path(path), family, unet_config
        self._handle = safe_open(str(path), framework="pt")
        self._keys = set(self._handle.keys())

    def close(self) -> None:
        self._handle = None

    def weight(self, part: str, path: str, shape: torch.Size) -> torch.Tensor:
        if part == "unet":
            key = layout.UNET_PREFIX + layout.original_unet_path(path, self.unet_config) + ".weight"
            tensor = self._read(key, part, path)
        else:
            kind, prefix = TEXT_LAYOUTS[(self.family, part)]
            inner = path.removeprefix("text_model.")
            tensor = (self._clip(prefix, inner, part, path) if kind == "clip"
                      else self._openclip(prefix, inner, part, path))
        if tensor.numel() != shape.numel():
            raise ValueError(f"checkpoint: {self.path.name} holds {part} {path} as "
                             f"{list(tensor.shape)}, the base model as {list(shape)}; extract "
                             "from the model it was trained from")
        return tensor.reshape(shape).float()  # SD 1.x proj_in/out: 1x1 convs here, maybe not there

    def _read(self, key: str, part: str, path: str, rows: slice | None = None) -> torch.Tensor:
        if key not in self._keys:
            raise ValueError(f"checkpoint: {self.path.name} has no {key!r} ({part} {path}); "
                             "extract from a checkpoint of the base model's family")
        if rows is None:
            return self._handle.get_tensor(key)
        return self._handle.get_slice(key)[rows]

    def _clip(self, prefix: str, inner: str, part: str, path: str) -> torch.Tensor:
        key = prefix + inner + ".weight"
        old = prefix.removesuffix("text_model.") + inner + ".weight"  # files without that level
        return self._read(old if key not in self._keys and old in self._keys else key, part, path)

    def _openclip(self, prefix: str, inner: str, part: str, path: str) -> torch.Tensor:
        if not inner.startswith("encoder.layers."):
            raise ValueError(f"checkpoint: no original-layout name for {part} {path}")
        index, rest = inner[len("encoder.layers."):].split(".", 1)
        block = f"{prefix}transformer.resblocks.{index}."
        projection = rest.removeprefix("self_attn.")
        if projection in QKV:  # fused as rows [q; k; v] of in_proj_weight
            key = block + "attn.in_proj_weight"
            width = self._handle.get_slice(key).get_shape()[1] if key in self._keys else 0
            start = QKV[projection] * width
            return self._read(key, part, path, slice(start, start + width))
        name = layout._longest_prefix(rest + ".", layout.OPENCLIP_LAYER)
        if name is None:
            raise ValueError(f"checkpoint: no original-layout name for {part} {path}")
        renamed = layout.OPENCLIP_LAYER[name] + (rest + ".")[len(name):]
        return self._read(block + renamed + "weight", part, path)


def open_checkpoint(location, family: str, unet_config) -> CheckpointWeights | None:
    """The file's weights by name, or None when it is not a `.safetensors` file whose layout
    this module reads (then load it as a model)."""
    path = Path(location)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    if family not in {f for f, _ in TEXT_LAYOUTS}:
        return None
    return CheckpointWeights(path, family, unet_config)
