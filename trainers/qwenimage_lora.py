"""Where a LoRA goes in Qwen-Image and how its file names it (Family.lora_layout).

Targets: every Linear of the dual-stream `transformer_blocks` except the adaLN modulation
(`img_mod.1`, `txt_mod.1`): image and text q/k/v (`attn.to_q` ..., `attn.add_q_proj` ...), the
two output projections (`attn.to_out.0`, `attn.to_add_out`) and both GELU MLPs
(`img_mlp.net.0.proj`, `img_mlp.net.2`, the same for `txt_mlp`), twelve per block, as
musubi-tuner's `networks.lora_qwen_image` trains by default (all Linears of
QwenImageTransformerBlock, `_mod_` excluded). Qwen2.5-VL never trains: no text-encoder LoRA
(`trains_text_encoder` False; a run asking for one is refused before queueing).

File keys are kohya-style, `lora_unet_<diffusers module path, "." -> "_">` with
`.lora_down.weight`, `.lora_up.weight` and `.alpha` (`lora_unet_transformer_blocks_0_attn_to_q`,
`..._attn_to_out_0`, `..._img_mlp_net_0_proj`): musubi-tuner's names. Both loaders read them:
diffusers' `QwenImageLoraLoaderMixin` (`_convert_non_diffusers_qwen_lora_to_diffusers` turns
"_" back into "." keeping `to_q`, `to_out`, `add_q_proj`, `img_mlp` ... whole, and folds alpha
into the factors), and ComfyUI, whose Qwen-Image model has diffusers' module names, so its
generic `lora_unet_` + state-dict-key map covers every key."""
from __future__ import annotations

import re

from torch import nn

from trainers.lora_network import LoraTarget, UnetLayout, kohya_name

_BLOCK = re.compile(r"transformer_blocks\.\d+\.(.+)")
FROZEN = ("img_mod.1", "txt_mod.1")  # the modulation Linears musubi-tuner excludes


class QwenImageLayout(UnetLayout):
    trains_text_encoder = False

    def denoiser_targets(self, model: nn.Module, conv: bool) -> list[LoraTarget]:
        return [LoraTarget(kohya_name("lora_unet", path), path, "unet", False)
                for path, module in model.named_modules()
                if isinstance(module, nn.Linear) and (match := _BLOCK.fullmatch(path))
                and match.group(1) not in FROZEN]

    def text_parts(self, text_encoder, text_encoder_2) -> dict[str, tuple[nn.Module, str]]:
        return {}


QWENIMAGE_LAYOUT = QwenImageLayout()


def metadata(model) -> dict[str, str | None]:
    """What musubi-tuner's Qwen-Image LoRA files say of their model (its architecture name,
    network module and sai_model_spec entries)."""
    return {"ss_base_model_version": "qwen_image",
            "ss_network_module": "networks.lora_qwen_image",
            "modelspec.architecture": "Qwen-Image/lora",
            "modelspec.implementation": "https://github.com/QwenLM/Qwen-Image",
            "modelspec.prediction_type": None, "ss_clip_skip": None,
            "modelspec.encoder_layer": None}
