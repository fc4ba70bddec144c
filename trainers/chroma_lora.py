"""Where a LoRA goes in Chroma and how its file names it (Family.lora_layout).

Chroma keeps Flux.1's block layout, so its LoRAs use kohya sd-scripts' Flux names, as
sd-scripts' Chroma training writes them: `lora_unet_double_blocks_N_img_attn_qkv`,
`..._img_attn_proj`, `..._img_mlp_0` / `_2` and the same for `txt`, and
`lora_unet_single_blocks_N_linear1` / `linear2`, with q/k/v (and single blocks' MLP input) fused
as in trainers/flux_lora.py. Chroma has no per-block modulation Linears (`img_mod_lin`,
`modulation_lin`): its blocks' norms take slices of the approximator's output, and the
approximator (`distilled_guidance_layer`) is not trained. diffusers' ChromaPipeline loads LoRAs
through FluxLoraLoaderMixin, whose kohya converter reads exactly these names (at the real
widths: it splits `linear1` at 3072 / 12288, as for Flux.1). T5 never trains, so there is no
text-encoder LoRA."""
from __future__ import annotations

from torch import nn

from trainers.flux_lora import FluxLayout

BLOCK_CLASSES = ("ChromaTransformerBlock", "ChromaSingleTransformerBlock")


class ChromaLayout(FluxLayout):
    trains_text_encoder = False
    block_classes = BLOCK_CLASSES
    layer_types = ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "single")  # no modulation layers

    def text_parts(self, text_encoder, text_encoder_2) -> dict[str, tuple[nn.Module, str]]:
        return {}


CHROMA_LAYOUT = ChromaLayout()


def metadata(model) -> dict[str, str | None]:
    """What kohya's Chroma LoRA files say of their model (sd-scripts' sai_model_spec
    ARCH_FLUX_1_CHROMA; Chroma trains through its Flux network module)."""
    return {"ss_base_model_version": "chroma", "ss_network_module": "networks.lora_flux",
            "modelspec.architecture": "chroma/lora",
            "modelspec.implementation": "https://huggingface.co/lodestones/Chroma1-HD",
            "modelspec.prediction_type": None, "ss_clip_skip": None,
            "modelspec.encoder_layer": None}
