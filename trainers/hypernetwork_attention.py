"""Apply a hypernetwork to a diffusers U-Net through attention processors.

Where A1111 applies it (modules/sd_hijack_optimizations.py, every attention forward): the
context is the text encoding for cross-attention and the block's own hidden states for
self-attention; the key is to_k(hyper_k(context)) and the value to_v(hyper_v(context)), with
the pair chosen by the context's width. So with sizes 320/640/1280 the self-attention layers
of the SD1 U-Net blocks are changed too, and 768/1024 change the cross-attention. The query is
never changed. The VAE is not touched.

Here a processor object (not an nn.Module, so the U-Net's parameters and state dict stay
unchanged) is set on each diffusers Attention module whose context width has an enabled size;
the other modules keep their processors. Nothing in diffusers is patched.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from trainers.hypernetwork_net import Hypernetwork


class HypernetworkAttnProcessor:
    """Scaled-dot-product attention whose key and value come from the hypernetwork-transformed
    context. `strength` is the multiplier in eval mode; in training mode it is 1 (A1111)."""

    def __init__(self, hypernetwork: Hypernetwork, strength: float = 1.0):
        self.hypernetwork = hypernetwork
        self.strength = float(strength)

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = None
        if hidden_states.ndim == 4:
            image_shape = hidden_states.shape
            batch, channels, height, width = image_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        context_length = (hidden_states if encoder_hidden_states is None
                          else encoder_hidden_states).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        context_k, context_v = self._contexts(context)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=0.0, is_causal=False, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.hypernetwork.get(context.shape[-1])
        if pair is None:
            return context, context
        module_k, module_v = pair
        # run the MLPs in their own dtype and device (A1111 runs them in float) and hand the
        # results back in the U-Net's
        weight = next(module_k.parameters())
        source = context.to(weight.device, weight.dtype)
        return (module_k(source, self.strength).to(context.device, context.dtype),
                module_v(source, self.strength).to(context.device, context.dtype))


def attention_modules(unet) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of every diffusers Attention module of the U-Net."""
    for name, module in unet.named_modules():
        if hasattr(module, "set_processor") and hasattr(module, "to_k") and \
                hasattr(module, "to_v") and getattr(module, "to_k") is not None:
            yield name, module


_attention_modules = attention_modules  # older name


def attention_widths(unet) -> set[int]:
    """The context widths of the U-Net's attention modules: the sizes a hypernetwork can use."""
    return {context_width(module) for _, module in attention_modules(unet)}


def context_width(attn) -> int:
    """The width of the context an Attention module reads keys and values from."""
    return int(attn.to_k.in_features)


def target_modules(unet, hypernetwork: Hypernetwork) -> list[str]:
    """Names of the U-Net's attention modules the hypernetwork changes."""
    return [name for name, module in attention_modules(unet)
            if context_width(module) in hypernetwork.layers
            and getattr(module, "added_kv_proj_dim", None) is None]


def _swap(unet, processor: HypernetworkAttnProcessor) -> dict[str, object]:
    targets = set(target_modules(unet, processor.hypernetwork))
    previous: dict[str, object] = {}
    for name, module in attention_modules(unet):
        if name in targets:
            previous[name] = module.processor
            module.set_processor(processor)
    return previous


def _restore(unet, previous: dict[str, object]) -> None:
    modules = dict(unet.named_modules())
    for name, processor in previous.items():
        modules[name].set_processor(processor)


@contextmanager
def applied(unet, hypernetwork: Hypernetwork, strength: float = 1.0):
    """Within the block, `unet` runs with the hypernetwork applied at `strength` (eval mode;
    in training mode the multiplier is 1, as in A1111). The previous processors come back on
    exit, also after an exception. Yields the processor (its `strength` can be changed)."""
    processor = HypernetworkAttnProcessor(hypernetwork, strength)
    previous = _swap(unet, processor)
    try:
        yield processor
    finally:
        _restore(unet, previous)


_installed: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, object]]" = \
    weakref.WeakKeyDictionary()


def install(unet, hypernetwork: Hypernetwork, strength: float = 1.0) -> None:
    """Apply until remove(unet); installing again replaces the hypernetwork or strength."""
    remove(unet)
    _installed[unet] = _swap(unet, HypernetworkAttnProcessor(hypernetwork, strength))


def remove(unet) -> None:
    """Undo install(unet); does nothing when nothing is installed."""
    previous = _installed.pop(unet, None)
    if previous is not None:
        _restore(unet, previous)


def is_installed(unet) -> bool:
    return unet in _installed
