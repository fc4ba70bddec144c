"""The published denoiser configs (diffusers' class and its arguments) of the flow-matching
families and of SDXL, so that real shapes can be built on the meta device without the weights:
parameter counts, LoRA key lists, and the memory measurement (bench/flow_memory.py). Torch-free
until `build` is called."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PublishedShape:
    model: str  # the published model this is ("black-forest-labs/FLUX.1-dev")
    transformer_class: str  # diffusers' class
    config: dict  # its config.json's arguments
    blocks: tuple[str, ...]  # the config's block-count arguments, one per kind of block (none:
    # a U-Net, measured whole)
    context: str  # the argument that is the text encoder's output width
    extra_widths: tuple[str, ...] = field(default=())  # other text-side input widths (pooled)

    def block_counts(self) -> dict[str, int]:
        return {name: self.config[name] for name in self.blocks}

    def with_changes(self, **changes) -> "PublishedShape":
        """The same shape with some arguments changed (fewer blocks, a narrower text input)."""
        return PublishedShape(self.model, self.transformer_class, {**self.config, **changes},
                              self.blocks, self.context, self.extra_widths)

    def build(self, device: str = "meta"):
        """The transformer, on the meta device by default (no memory, no weights)."""
        import diffusers
        import torch
        with torch.device(device):
            return getattr(diffusers, self.transformer_class)(**self.config)


def _shipped(family: str) -> dict:
    """The U-Net config of the single-file skeleton Danlu ships for the family."""
    config = json.loads((Path(__file__).parent / "model_configs" / family / "unet" /
                         "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


SHAPES = {
    "flux1": PublishedShape(
        "black-forest-labs/FLUX.1-dev", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        ("num_layers", "num_single_layers"), "joint_attention_dim", ("pooled_projection_dim",)),
    "chroma": PublishedShape(
        "lodestones/Chroma1-HD", "ChromaTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             axes_dims_rope=(16, 56, 56), approximator_num_channels=64,
             approximator_hidden_dim=5120, approximator_layers=5),
        ("num_layers", "num_single_layers"), "joint_attention_dim"),
    "flux2_klein": PublishedShape(
        "black-forest-labs/FLUX.2-klein-4B", "Flux2Transformer2DModel",
        dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
             timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
             rope_theta=2000, guidance_embeds=False),
        ("num_layers", "num_single_layers"), "joint_attention_dim"),
    "zimage": PublishedShape(
        "Tongyi-MAI/Z-Image-Turbo", "ZImageTransformer2DModel",
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
             n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
             axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512]),
        ("n_layers", "n_refiner_layers"), "cap_feat_dim"),
    "sdxl": PublishedShape(
        "stabilityai/stable-diffusion-xl-base-1.0", "UNet2DConditionModel", _shipped("sdxl"),
        (), "cross_attention_dim", ("projection_class_embeddings_input_dim",)),
    "qwen_image": PublishedShape(
        "Qwen/Qwen-Image", "QwenImageTransformer2DModel",
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
             axes_dims_rope=(16, 56, 56)),
        ("num_layers",), "joint_attention_dim"),
}


def shape(family: str) -> PublishedShape:
    if family not in SHAPES:
        raise KeyError(f"no published transformer shape for {family!r}; known: "
                       f"{', '.join(SHAPES)}")
    return SHAPES[family]
