"""Where a LoRA goes in Flux.1 and how its file names it (Family.lora_layout): every Linear of
the double- and single-stream blocks, named as kohya sd-scripts names Flux.1 LoRAs
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, ...), with the
q/k/v (and single blocks' MLP) adapters that diffusers keeps apart fused into the one BFL layer
they form (trainers/formats/flux_lora_keys.py). CLIP-L's LoRA is `lora_te1`, as kohya writes it."""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from trainers.configs import block_indices
from trainers.formats import flux_lora_keys as keys
from trainers.lora_network import LoraTarget, UnetLayout


BLOCK_NAME = re.compile(r"lora_unet_(double|single)_blocks_(\d+)_")
BLOCK_LISTS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


# kohya's Flux type_dims, each the name parts that mark it, first match wins (networks/lora_flux)
LAYER_TYPES = (("img_attn", ("img_attn",)), ("txt_attn", ("txt_attn",)), ("img_mlp", ("img_mlp",)),
               ("txt_mlp", ("txt_mlp",)), ("img_mod", ("img_mod",)), ("txt_mod", ("txt_mod",)),
               ("single", ("single_blocks", "linear")), ("single_mod", ("modulation",)))


class FluxLayout(UnetLayout):
    block_classes = keys.BLOCK_CLASSES
    block_kinds = ("double", "single")
    layer_types = tuple(name for name, _ in LAYER_TYPES)

    def layer_type(self, name: str) -> str | None:
        return next((kind for kind, marks in LAYER_TYPES if all(m in name for m in marks)), None)

    def denoiser_targets(self, model: nn.Module, conv: bool) -> list[LoraTarget]:
        targets: dict[str, LoraTarget] = {}
        for block_path, block in model.named_modules():
            if type(block).__name__ not in self.block_classes:
                continue
            for child_path, child in block.named_modules():
                if not isinstance(child, nn.Linear):
                    continue
                path = f"{block_path}.{child_path}"
                name = keys.kohya_name(path)
                if name is not None:
                    targets.setdefault(path, LoraTarget(name, path, "unet", False))
        return list(targets.values())

    def select(self, targets: list[LoraTarget], blocks: Mapping[str, str],
               model: nn.Module) -> list[LoraTarget]:
        """kohya's train_double_block_indices / train_single_block_indices."""
        super().select(targets, blocks, model)
        chosen = {}
        for kind, text in blocks.items():
            count = len(getattr(model, BLOCK_LISTS[kind]))
            try:
                chosen[kind] = set(block_indices(text, count))
            except ValueError as error:
                raise ValueError(f"train_{kind}_block_indices: {error}") from None
        kept = [t for t in targets if not (m := BLOCK_NAME.match(t.name))
                or m.group(1) not in chosen or int(m.group(2)) in chosen[m.group(1)]]
        if not kept:
            raise ValueError("LoRA: the block choice leaves no block to train")
        return kept

    def blocks_in(self, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
        found: dict[str, set[int]] = {"double": set(), "single": set()}
        for key in state:
            if (m := BLOCK_NAME.match(key)):
                found[m.group(1)].add(int(m.group(2)))
        return {kind: ",".join(map(str, sorted(ids))) or "none" for kind, ids in found.items()}

    def text_parts(self, text_encoder, text_encoder_2) -> dict[str, tuple[nn.Module, str]]:
        return {"text_encoder": (text_encoder, "lora_te1")}  # T5 is not trained

    def to_file(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return keys.fuse_state(state)

    def from_file(self, state: Mapping[str, torch.Tensor],
                  out_sizes: Mapping[str, int]) -> Mapping[str, torch.Tensor]:
        return keys.split_state(state, slot_sizes(out_sizes))


def slot_sizes(out_sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """fused file name -> each slot's output features, in slot order."""
    groups: dict[str, dict[int, int]] = {}
    for name, size in out_sizes.items():
        fused, mark, slot = name.partition(keys.SLOT)
        if mark:
            groups.setdefault(fused, {})[int(slot)] = size
    return {fused: tuple(sizes[i] for i in sorted(sizes)) for fused, sizes in groups.items()}


FLUX_LAYOUT = FluxLayout()


def metadata(model) -> dict[str, str | None]:
    """What kohya's Flux LoRA files say of their model (sd-scripts' sai_model_spec names);
    a model without a guidance embedding is schnell."""
    variant = "dev" if model.unet.config.guidance_embeds else "schnell"
    return {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux",
            "modelspec.architecture": f"flux-1-{variant}/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
            "modelspec.prediction_type": None, "ss_clip_skip": None,
            "modelspec.encoder_layer": None}
