"""LoRA-family files with the layer names Danlu writes for each family's full-size model: the
targets and file layout of Danlu's own networks (trainers/lora_network.py and the families'
layouts) on each model built on the meta device from its published config, with rank-1
tensors of the real widths (for the Check's tests, tests/test_key_check.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "trainers/model_configs"
VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0", "flux1": "flux1",
            "chroma": "chroma", "flux2_klein": "flux2", "zimage": "zimage",
            "qwen_image": "qwen_image"}


def _clip(family: str, folder: str):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = json.loads((CONFIGS / family / folder / "config.json").read_text())
    return CLIPTextModel(CLIPTextConfig(num_hidden_layers=config["num_hidden_layers"]))


def targets(family: str, conv: bool = False) -> list:
    """[(LoraTarget, module)] Danlu adapts in the family's full-size model (meta device)."""
    from trainers.lora_network import UNET_LAYOUT, find_targets, text_encoder_prefixes
    with torch.device("meta"):
        if family in ("sd1", "sd2", "sdxl"):
            from diffusers import UNet2DConditionModel
            unet = UNet2DConditionModel.from_config(
                json.loads((CONFIGS / family / "unet/config.json").read_text()))
            encoders = {"text_encoder": _clip("sd1" if family == "sdxl" else family, "text_encoder")}
            if family == "sdxl":
                encoders["text_encoder_2"] = _clip("sdxl", "text_encoder_2")
            found = [(t, unet) for t in UNET_LAYOUT.denoiser_targets(unet, conv)]
            prefixes = text_encoder_prefixes(encoders.get("text_encoder_2"))
            for part, model in encoders.items():
                found += [(t, model) for t in find_targets(model, part, conv, prefixes[part])]
            return found
        import diffusers
        from trainers import families
        layout = families.get(family).hook("lora_layout")
        model = {"flux1": lambda: diffusers.FluxTransformer2DModel(guidance_embeds=True),
                 "chroma": diffusers.ChromaTransformer2DModel,
                 "flux2_klein": lambda: diffusers.Flux2Transformer2DModel(
                     patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                     timestep_guidance_channels=256, mlp_ratio=3.0,
                     axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False),
                 "zimage": diffusers.ZImageTransformer2DModel,
                 "qwen_image": diffusers.QwenImageTransformer2DModel}[family]()
        found = [(t, model) for t in layout.denoiser_targets(model, conv)]
        if family == "flux1":
            clip = _clip("sd1", "text_encoder")
            found += [(t, clip) for t in find_targets(clip, "text_encoder", False, "lora_te1")]
        return found


def lora_state(family: str, conv: bool = False, algo: str = "lora") -> dict[str, torch.Tensor]:
    """A file state of rank-1 factors for every target (fused as the family's layout writes)."""
    from trainers import families
    state = {}
    for target, model in targets(family, conv):
        module = model.get_submodule(target.path)
        if isinstance(module, torch.nn.Linear):
            out, inner, kernel = module.out_features, module.in_features, ()
        else:
            out, inner, kernel = module.out_channels, module.in_channels, tuple(module.kernel_size)
        name = target.name
        if algo == "lora":
            state[f"{name}.lora_down.weight"] = torch.full((1, inner, *kernel), 0.01)
            state[f"{name}.lora_up.weight"] = torch.full((out, 1, *((1, 1) if kernel else ())), 0.01)
        elif algo == "loha":
            flat = inner * (kernel[0] * kernel[1] if kernel else 1)
            for w in ("w1", "w2"):
                state[f"{name}.hada_{w}_a"] = torch.full((out, 1), 0.01)
                state[f"{name}.hada_{w}_b"] = torch.full((1, flat), 0.01)
        else:  # lokr: w1 a full [1, 1] factor, w2 factored at rank 1
            state[f"{name}.lokr_w1"] = torch.ones(1, 1)
            state[f"{name}.lokr_w2_a"] = torch.full((out, 1), 0.01)
            state[f"{name}.lokr_w2_b"] = torch.full((1, inner * (kernel[0] * kernel[1] if kernel else 1)), 0.01)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    if family in ("sd1", "sd2", "sdxl"):
        return state
    return families.get(family).hook("lora_layout").to_file(state)


def write(path: Path, family: str, conv: bool = False, algo: str = "lora",
          state: dict | None = None, metadata: dict | None = None) -> Path:
    from trainers.formats.lora import save_lora
    from trainers.formats.lycoris import lycoris_metadata, save_lycoris
    state = lora_state(family, conv, algo) if state is None else state
    meta = {"ss_base_model_version": VERSIONS[family], **(metadata or {})}
    if algo == "lora":
        save_lora(path, state, meta)
    else:
        save_lycoris(path, state, lycoris_metadata(meta, algo))
    return path
