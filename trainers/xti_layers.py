"""Extended textual inversion (XTI, "P+"): one conditioning per U-Net cross-attention layer.

Layers are named as kohya's XTI files name them, after the original SD layout's input / middle
/ output blocks: for SD1 (two layers per block) IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03 ... OUT11,
16 in all; other U-Nets get the same numbering from their own layers_per_block.

The per-layer conditionings travel through the U-Net as one context, the layers' contexts side by
side along the sequence axis; while `per_layer(unet)` is active, each cross-attention layer
takes its own slice. Everything that passes a context on (classifier-free guidance batches,
pipelines) therefore works unchanged."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def cross_attention_layers(unet) -> list[tuple[str, torch.nn.Module]]:
    """(kohya name, attention module) for every cross-attention layer, in kohya's order."""
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError("XTI needs a U-Net with the same number of layers in every block (SD1/SD2)")
    layers = []
    for i, block in enumerate(unet.down_blocks):
        for j, attention in enumerate(getattr(block, "attentions", None) or []):
            layers.append((f"IN{1 + i * (per_block + 1) + j:02d}", attention))
    for attention in getattr(unet.mid_block, "attentions", None) or []:
        layers.append(("MID", attention))
    for i, block in enumerate(unet.up_blocks):
        for j, attention in enumerate(getattr(block, "attentions", None) or []):
            layers.append((f"OUT{i * (per_block + 1) + j:02d}", attention))
    return layers


def layer_names(unet) -> list[str]:
    return [name for name, _ in cross_attention_layers(unet)]


@contextmanager
def per_layer(unet):
    """Give each cross-attention layer its own slice of the context while active."""
    layers = cross_attention_layers(unet)
    count = len(layers)

    def slicer(index: int):
        def hook(module, args, kwargs):
            context = kwargs.get("encoder_hidden_states")
            if context is None or context.shape[1] % count:
                raise ValueError(f"XTI: expected a context of {count} layers side by side, got "
                                 f"{None if context is None else tuple(context.shape)}")
            length = context.shape[1] // count
            kwargs["encoder_hidden_states"] = context[:, index * length:(index + 1) * length]
            return args, kwargs
        return hook

    handles = [module.register_forward_pre_hook(slicer(i), with_kwargs=True)
               for i, (_, module) in enumerate(layers)]
    try:
        yield [name for name, _ in layers]
    finally:
        for handle in handles:
            handle.remove()


class XtiEncoder:
    """Captions -> the per-layer contexts side by side: layer k's context is the caption
    encoded with layer k's vectors for the embedding's name."""

    def __init__(self, prompt_encoder, name: str, vectors: dict[str, torch.Tensor]):
        self.prompts = prompt_encoder  # a PromptEncoder; its entry for `name` is swapped per layer
        self.name = name
        self.vectors = vectors  # layer name -> [n, dim], in layer order

    def encode(self, texts: list[str]) -> torch.Tensor:
        parts = []
        try:
            for vectors in self.vectors.values():
                self.prompts.embeddings[self.name] = vectors
                parts.append(self.prompts.encode(texts))
        finally:
            self.prompts.embeddings.pop(self.name, None)
        return torch.cat(parts, dim=1)
