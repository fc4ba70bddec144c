"""Where a LoRA goes in Flux.2 Klein and how its file names it (Family.lora_layout).

Targets: every Linear of the double-stream blocks (image and text q/k/v, output projections,
SwiGLU MLP in / out) and of the single-stream blocks (the fused qkv+MLP input and the output);
the modulation layers are shared by all blocks in Flux.2 (outside them) and stay frozen, as
musubi-tuner's `networks.lora_flux_2` excludes modulation. Qwen3 never trains: no text-encoder
LoRA (`trains_text_encoder` False; a run asking for one is refused before queueing).

File keys are kohya's names after BFL's original Flux.2 layout, as musubi-tuner writes Flux.2
LoRAs: `lora_unet_double_blocks_N_img_attn_qkv`, `..._img_attn_proj`, `..._img_mlp_0` / `_2`,
the same for `txt`, and `lora_unet_single_blocks_N_linear1` / `linear2`, with `.lora_down`,
`.lora_up` and `.alpha`. diffusers' `Flux2LoraLoaderMixin` turns exactly these names back into
its modules (`_convert_kohya_flux2_lora_to_diffusers`: a fused qkv is split into three equal
parts, and a block-diagonal lora_up, which Danlu writes, is split exactly), and ComfyUI maps
`lora_unet_` + BFL key names for any BFL-layout model. diffusers keeps q, k and v apart in the
double blocks, so they are fused here as for Flux.1 (trainers/formats/flux_lora_keys.py); the
single blocks' `to_qkv_mlp_proj` is already BFL's one `linear1`, so nothing is fused there.
(The other Flux.2 layout diffusers reads, ai-toolkit's `diffusion_model.double_blocks...`
with lora_A / lora_B, has no alpha and dots in its module names, which Danlu's kohya file format
cannot hold.)"""
from __future__ import annotations

import re

from torch import nn

from trainers.flux_lora import FluxLayout
from trainers.formats.flux_lora_keys import PREFIX, SLOT
from trainers.lora_network import LoraTarget

BLOCK_CLASSES = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")
# diffusers path inside a block -> (BFL name inside the block, slot index or None)
DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_add_out": ("txt_attn_proj", None),
    "ff.linear_in": ("img_mlp_0", None),
    "ff.linear_out": ("img_mlp_2", None),
    "ff_context.linear_in": ("txt_mlp_0", None),
    "ff_context.linear_out": ("txt_mlp_2", None),
}
SINGLE = {
    "attn.to_qkv_mlp_proj": ("linear1", None),
    "attn.to_out": ("linear2", None),
}
_BLOCK = re.compile(r"(single_)?transformer_blocks\.(\d+)\.(.+)")


def kohya_name(path: str) -> str | None:
    """The internal kohya name of a Flux.2 transformer module path (`<fused>@<slot>` for a
    slot of BFL's fused qkv), or None when it is not a LoRA target."""
    match = _BLOCK.fullmatch(path)
    if match is None:
        return None
    single, index, rest = match.groups()
    entry = (SINGLE if single else DOUBLE).get(rest)
    if entry is None:
        return None
    bfl, slot = entry
    name = f"{PREFIX}{'single' if single else 'double'}_blocks_{int(index)}_{bfl}"
    return name if slot is None else f"{name}{SLOT}{slot}"


class Flux2Layout(FluxLayout):
    trains_text_encoder = False
    block_classes = BLOCK_CLASSES

    def denoiser_targets(self, model: nn.Module, conv: bool) -> list[LoraTarget]:
        return [LoraTarget(name, path, "unet", False)
                for path, module in model.named_modules()
                if isinstance(module, nn.Linear) and (name := kohya_name(path)) is not None]

    def text_parts(self, text_encoder, text_encoder_2) -> dict[str, tuple[nn.Module, str]]:
        return {}


FLUX2_LAYOUT = Flux2Layout()


def metadata(model) -> dict[str, str | None]:
    """What musubi-tuner's Flux.2 LoRA files say of their model (its sai_model_spec names:
    Flux.2-klein-4b / -9b, told apart by the transformer's heads: 24 / 32)."""
    heads = model.unet.config.num_attention_heads
    variant = "9b" if heads == 32 else "4b"
    return {"ss_base_model_version": "flux2", "ss_network_module": "networks.lora_flux_2",
            "modelspec.architecture": f"Flux.2-klein-{variant}/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux2",
            "modelspec.prediction_type": None, "ss_clip_skip": None,
            "modelspec.encoder_layer": None}
