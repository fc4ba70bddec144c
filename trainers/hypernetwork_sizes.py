"""Which hypernetwork module sizes fit a base model, without loading it (torch-free).

A1111 looks a hypernetwork's modules up by the width of the context each attention layer reads
keys and values from (`layers.get(context.shape[2])`), for SDXL's U-Net as for SD1's: the text
context for cross-attention (768 SD1, 1024 SD2, 2048 SDXL: both encoders side by side) and the
block's own width for self-attention (320/640/1280 in SD1/SD2; SDXL has attention only in its
640 and 1280 blocks). A1111's page offers 768/1024/320/640/1280 only; a 2048 module is what
changes SDXL's cross-attention.
"""
from __future__ import annotations

import json
from pathlib import Path

def unet_config_sizes(config: dict) -> list[int]:
    """[context width, self-attention widths ascending] from a diffusers U-Net config."""
    channels = list(config.get("block_out_channels") or [])
    down = config.get("down_block_types") or []
    up = config.get("up_block_types") or []
    widths = {channels[i] for i, kind in enumerate(down) if "CrossAttn" in kind and i < len(channels)}
    widths |= {ch for ch, kind in zip(reversed(channels), up) if "CrossAttn" in kind}
    if channels and config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        widths.add(channels[-1])
    context = config.get("cross_attention_dim")
    context = [int(context)] if isinstance(context, int) else []
    return context + sorted(w for w in widths if w not in context)


def checkpoint_sizes(shapes: dict) -> list[int]:
    """[context width, self-attention widths ascending] from an original-layout file's key ->
    shape: the input width of each U-Net attention's to_k (attn2 reads the text context)."""
    context, own = set(), set()
    for key, shape in shapes.items():
        if key.startswith("model.diffusion_model.") and key.endswith(".to_k.weight") \
                and len(shape) == 2:
            (context if ".attn2." in key else own).add(int(shape[1]))
    return sorted(context) + sorted(own - context)


def model_sizes(paths, name: str) -> list[int] | None:
    """The module sizes of the base model named in a model dropdown; None when they cannot be
    told without loading it (a .ckpt, a hub id, a missing file)."""
    from trainers import families
    name = (name or "").strip()
    demo = families.demo_of(name)
    if demo is not None:  # a test checks them against the built U-Nets
        return list(demo.hypernetwork_sizes)
    folder = Path(paths.stable_diffusion) / name
    config = folder / "unet" / "config.json"
    if name and config.is_file():
        try:
            sizes = unet_config_sizes(json.loads(config.read_text()))
        except (OSError, ValueError):
            sizes = []
        if sizes:
            return sizes
    if name and folder.suffix.lower() == ".safetensors" and folder.is_file():
        from trainers.families import safetensors_shapes
        try:  # the file's own widths: a fine-tune of a demo model is not SD-sized
            sizes = checkpoint_sizes(safetensors_shapes(folder))
        except (OSError, ValueError):
            sizes = []
        if sizes:
            return sizes
    family = families.guess_family(paths, name) if name else None
    return list(families.get(family).hypernetwork_sizes) if family else None


def sizes_text(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes))
