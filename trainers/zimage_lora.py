"""Where a LoRA goes in Z-Image and how its file names it (Family.lora_layout).

Targets: the attention (to_q, to_k, to_v, to_out.0) and feed-forward (w1, w2, w3) Linears of
the main `layers`, as musubi-tuner's and OneTrainer's Z-Image LoRAs train by default; the noise
and context refiners and the adaLN modulation stay frozen (both exclude them; musubi-tuner
notes that modulation adapters destabilise training). Z-Image has no text-encoder LoRA: Qwen3
never trains (`trains_text_encoder` False; a run asking for it is refused before queueing).

File keys are kohya-style, `lora_unet_<diffusers module path, "." -> "_">` with
`.lora_down.weight`, `.lora_up.weight` and `.alpha` (`lora_unet_layers_0_attention_to_q`,
`lora_unet_layers_0_feed_forward_w1`): musubi-tuner's Z-Image names, and the form diffusers'
`_convert_non_diffusers_z_image_lora_to_diffusers` was written for (it keeps `to_q`, `to_out`
and `feed_forward` whole when it turns "_" back into "."), so `ZImagePipeline.load_lora_weights`
loads the file. Danlu's own LoRA tools (resume, Compare, resize) read it like any kohya file.

ComfyUI names kohya keys after Z-Image's original layout (fused `attention.qkv`,
`attention.out`), so it would take only the feed-forward part of this file; what it maps for
Z-Image are diffusers module paths under `transformer.` / `diffusion_model.`. *Also save
diffusers format* writes exactly that (`transformer.<path>.lora_A/B.weight`, the scale folded
in), which both ComfyUI and diffusers load: that folder is the file for ComfyUI. Writing the
main file as `diffusion_model.<path>.lora_down.weight` would suit both too, but Danlu's kohya
file format (one dot-free module name per key) cannot hold it."""
from __future__ import annotations

from torch import nn

from trainers.lora_network import LoraTarget, UnetLayout, kohya_name

BLOCKS = "layers."  # the main blocks; noise_refiner / context_refiner are not trained
LINEARS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class ZImageLayout(UnetLayout):
    trains_text_encoder = False

    def denoiser_targets(self, model: nn.Module, conv: bool) -> list[LoraTarget]:
        return [LoraTarget(kohya_name("lora_unet", path), path, "unet", False)
                for path, module in model.named_modules()
                if path.startswith(BLOCKS) and isinstance(module, nn.Linear)
                and path.split(".", 2)[-1] in LINEARS]

    def text_parts(self, text_encoder, text_encoder_2) -> dict[str, tuple[nn.Module, str]]:
        return {}


ZIMAGE_LAYOUT = ZImageLayout()


def metadata(model) -> dict[str, str | None]:
    """What Z-Image LoRA files say of their model (musubi-tuner's network module name)."""
    return {"ss_base_model_version": "zimage", "ss_network_module": "networks.lora_zimage",
            "modelspec.architecture": "z-image/lora",
            "modelspec.implementation": "https://github.com/Tongyi-MAI/Z-Image",
            "modelspec.prediction_type": None, "ss_clip_skip": None,
            "modelspec.encoder_layer": None}
