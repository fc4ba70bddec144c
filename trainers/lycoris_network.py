"""LyCORIS LoHa / LoKr adapters on the SD families' U-Net and CLIP text encoders, via peft's
implementations (`peft.LoHaConfig`, `peft.LoKrConfig`), on exactly the modules kohya's LoRA
adapts (trainers/lora_network.py: `find_targets`, the same kohya names), saved in LyCORIS's
keys (trainers/formats/lycoris.py). The interface is LoraNetwork's.

- LoHa: rank `rank` (`conv_rank` for kxk convs), scale alpha / rank; no Tucker factors
  (convs keep LyCORIS's flat [r, in*kh*kw] second factors), peft's initialisation (w2_b zeros).
- LoKr: Kronecker factors from LyCORIS's factorization (`factor`, -1 = as square as possible);
  w1 is always a full matrix (LyCORIS's default `decompose_both = False`), w2 is factored with
  the rank when the rank is below half its larger side, else full. With both full, LyCORIS
  uses no scale (alpha is stored as the rank); peft scales by alpha / r regardless, so such
  layers get alpha = r here. LyCORIS's initialisation (w2 / w2_b zeros).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from trainers.formats.lycoris import ALGOS, algo_of
from trainers.lora_network import (DIFFERENT_CONFIG, UNET_LAYOUT, AdaptedParts, LoraSpec,
                                   LoraStateError,
                                   LoraTarget, UnetLayout, _kohya_alpha, _parent_and_attr,
                                   _peft_layer_class, _some, find_targets)

ALGORITHMS = tuple(ALGOS)


@dataclass
class LycorisSpec(LoraSpec):
    algo: str = "loha"
    factor: int = -1   # LoKr's factorization factor; -1 = automatic

    def validate(self) -> None:
        super().validate()
        if self.algo not in ALGORITHMS:
            raise ValueError(f"unknown LyCORIS algorithm {self.algo!r}; use {', '.join(ALGORITHMS)}")
        if int(self.factor) == 0 or int(self.factor) < -1:
            raise ValueError(f"LoKr factor must be -1 (automatic) or at least 1, got {self.factor}")
        if self.dropout:
            raise ValueError("LoHa / LoKr have no dropout here (peft's and LyCORIS's ignore it)")


def _config(spec: LycorisSpec, targets: list[LoraTarget]):
    from peft import LoHaConfig, LoKrConfig
    rank, alpha = int(spec.rank), _kohya_alpha(spec.alpha, spec.rank)
    conv_rank = int(spec.conv_rank)
    conv_alpha = _kohya_alpha(spec.conv_alpha, conv_rank) if conv_rank else 0.0
    convs = [re.escape(t.path) for t in targets if t.conv]
    common = dict(r=rank, alpha=alpha, target_modules=[t.path for t in targets],
                  rank_pattern={p: conv_rank for p in convs},
                  alpha_pattern={p: conv_alpha for p in convs}, use_effective_conv2d=False)
    if spec.algo == "loha":
        return LoHaConfig(init_weights=True, **common)
    return LoKrConfig(init_weights="lycoris", decompose_both=False,
                      decompose_factor=int(spec.factor), **common)


class _LycorisPart:
    """The LoHa / LoKr adapters injected into one model, and what is needed to take them out."""

    def __init__(self, model: nn.Module, part: str, targets: list[LoraTarget], spec: LycorisSpec,
                 adapter_name: str, param_dtype: torch.dtype | None):
        from peft import inject_adapter_in_model

        self.model, self.part, self.targets, self.adapter = model, part, targets, adapter_name
        self.keys = ALGOS[spec.algo]
        tuner_layer = _peft_layer_class()
        if any(isinstance(m, tuner_layer) for m in model.modules()):
            raise RuntimeError(f"the {part} already carries peft adapters; remove them (or the "
                               "previous network) before adding a new one")
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.old_state = {key: vars(model)[key] for key in ("peft_config", "_hf_peft_config_loaded")
                          if key in vars(model)}
        self.layers: dict[str, nn.Module] = {}
        try:
            inject_adapter_in_model(_config(spec, targets), model, adapter_name=adapter_name)
        except BaseException:
            self.remove()
            raise
        self.alphas: dict[str, float] = {}
        for target in targets:
            layer = model.get_submodule(target.path)
            if not isinstance(layer, tuner_layer) or adapter_name not in layer._available_adapters:
                self.remove()
                raise RuntimeError(f"peft did not adapt {target.path} in the {part}")
            if spec.algo == "lokr" and adapter_name in layer.lokr_w1 and adapter_name in layer.lokr_w2:
                layer.alpha[adapter_name] = float(layer.r[adapter_name])  # LyCORIS: no scale
                layer.scaling[adapter_name] = 1.0
            self.alphas[target.name] = float(layer.alpha[adapter_name])
            self.layers[target.name] = layer
        for param in self.parameters():
            if param_dtype is not None and param.dtype != param_dtype:
                param.data = param.data.to(param_dtype)
            param.requires_grad_(True)
        ours = {id(p) for p in self.parameters()}
        for param in model.parameters():
            if id(param) not in ours:
                param.requires_grad_(False)

    def tensors(self, name: str) -> dict[str, nn.Parameter]:
        """file suffix -> parameter (peft's attribute names are LyCORIS's key suffixes)."""
        layer = self.layers[name]
        return {key: getattr(layer, key)[self.adapter] for key in self.keys
                if self.adapter in getattr(layer, key)}

    def parameters(self) -> list[nn.Parameter]:
        return [p for name in self.layers for p in self.tensors(name).values()]

    def set_strength(self, multiplier: float) -> None:
        for layer in self.layers.values():
            layer.set_scale(self.adapter, float(multiplier))

    def remove(self) -> None:
        tuner_layer = _peft_layer_class()
        for target in self.targets:
            parent, attr = _parent_and_attr(self.model, target.path)
            layer = getattr(parent, attr)
            if not isinstance(layer, tuner_layer):
                continue
            if set(layer._available_adapters) - {self.adapter}:
                layer.delete_adapter(self.adapter)
            else:
                setattr(parent, attr, layer.get_base_layer())
        state = vars(self.model)
        for key in ("peft_config", "_hf_peft_config_loaded"):
            state.pop(key, None)
        state.update(self.old_state)
        for name, param in self.model.named_parameters():
            if name in self.requires_grad:
                param.requires_grad_(self.requires_grad[name])
        self.layers = {}


class LycorisNetwork(AdaptedParts):
    """LoHa / LoKr (peft) on the modules kohya's LoRA adapts, with LoraNetwork's interface;
    `kohya_state_dict` gives LyCORIS's keys. The base weights are never changed; `remove()`
    puts the original modules back."""

    def __init__(self, unet: nn.Module | None, text_encoder: nn.Module | None, spec: LycorisSpec,
                 adapter_name: str = "danlu", param_dtype: torch.dtype | None = torch.float32,
                 text_encoder_2: nn.Module | None = None, layout: UnetLayout = UNET_LAYOUT):
        spec.validate()
        if type(layout) is not UnetLayout:
            raise ValueError("LoHa / LoKr train the SD families' U-Net and CLIP encoders only")
        self.spec, self.layout, self.adapter_name, self.strength = spec, layout, adapter_name, 1.0
        self._parts: dict[str, _LycorisPart] = {}
        wanted = []
        if spec.train_unet:
            if unet is None:
                raise ValueError(f"{spec.algo}: train_unet is set but no U-Net was given")
            wanted.append(("unet", unet, None))
        if spec.train_text_encoder:
            if text_encoder is None:
                raise ValueError(f"{spec.algo}: train_text_encoder is set but no text encoder "
                                 "was given")
            for part, (model, prefix) in layout.text_parts(text_encoder, text_encoder_2).items():
                wanted.append((part, model, prefix))
        try:
            for part, model, prefix in wanted:
                targets = (layout.denoiser_targets(model, spec.uses_conv) if part == "unet"
                           else find_targets(model, part, spec.uses_conv, prefix))
                if not targets:
                    raise ValueError(f"{spec.algo}: found no module to adapt in the {part}")
                self._parts[part] = _LycorisPart(model, part, targets, spec, adapter_name,
                                                 param_dtype)
        except BaseException:
            self.remove()
            raise


    def layer(self, name: str) -> nn.Module:
        """The peft layer adapting kohya module `name`."""
        for part in self._parts.values():
            if name in part.layers:
                return part.layers[name]
        raise KeyError(name)

    def set_strength(self, multiplier: float) -> None:
        """Scale the adapters' effect (1 = as trained, 0 = the base model's output exactly)."""
        self.strength = float(multiplier)
        for part in self._parts.values():
            part.set_strength(multiplier)

    def _entries(self):
        for part in self._parts.values():
            for target in part.targets:
                yield target.name, part.tensors(target.name), part.alphas[target.name]

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """`<name>.<LyCORIS key>` and `<name>.alpha` for every adapted module."""
        state: dict[str, torch.Tensor] = {}
        for name, tensors, alpha in self._entries():
            for key, param in tensors.items():
                state[f"{name}.{key}"] = param.detach().to("cpu", dtype).contiguous().clone()
            state[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        return state

    module_state_dict = kohya_state_dict

    def load_kohya_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy a LyCORIS state dict into the adapters; it must fit exactly (strict)."""
        expected: dict[str, torch.Tensor | None] = {}
        for name, tensors, _alpha in self._entries():
            for key, param in tensors.items():
                expected[f"{name}.{key}"] = param
            expected[f"{name}.alpha"] = None
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_some(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
        shapes = [f"{key}: file {list(state[key].shape)}, network {list(param.shape)}"
                  for key, param in expected.items() if param is not None and key in state
                  and tuple(state[key].shape) != tuple(param.shape)]
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches ({_some(shapes)})")
        alphas = []
        for name, _tensors, alpha in self._entries():
            value = state.get(f"{name}.alpha")
            if value is not None and (value.numel() != 1 or abs(float(value.float().reshape(()))
                                                                - alpha) > 1e-3 * max(1.0, alpha)):
                alphas.append(f"{name}.alpha: file {value.float().flatten()[:1].tolist()}, "
                              f"network {alpha:g}")
        if alphas:
            problems.append(f"{len(alphas)} alpha mismatches ({_some(alphas)})")
        if problems:
            raise LoraStateError(f"{self.spec.algo} weights do not fit this network "
                                 f"({DIFFERENT_CONFIG}; {self.spec.algo}, rank {self.spec.rank}, "
                                 f"conv rank {self.spec.conv_rank}): " + "; ".join(problems))
        with torch.no_grad():
            for key, param in expected.items():
                if param is not None:
                    param.copy_(state[key].to(param.device, param.dtype))

    def remove(self) -> None:
        for part in reversed(list(self._parts.values())):
            part.remove()
        self._parts = {}

    def __enter__(self) -> "LycorisNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def spec_from_state(state: Mapping[str, torch.Tensor], conv_names: set[str]) -> LycorisSpec:
    """The LycorisSpec a LoHa / LoKr state dict was made with; `conv_names`: the kohya names
    of the model's kxk convs (a flat LyCORIS conv factor does not show its kernel)."""
    from peft.tuners.lokr.layer import factorization
    algo = algo_of(state)
    if algo is None:
        raise ValueError("not a LoHa / LoKr state dict")
    ranks: dict[bool, tuple[int, float]] = {}
    factor = -1
    for name in sorted({key.split(".", 1)[0] for key in state}):
        alpha = state.get(f"{name}.alpha")
        alpha = None if alpha is None else float(alpha.float().reshape(()))
        if algo == "loha":
            rank = int(state[f"{name}.hada_w1_b"].shape[0])
        else:
            factored = state.get(f"{name}.lokr_w2_b")
            # both factors full: LyCORIS stores alpha = rank, the rank's only trace
            rank = int(factored.shape[0]) if factored is not None else int(alpha or 1)
            w1 = state[f"{name}.lokr_w1"]
            w2 = state.get(f"{name}.lokr_w2")
            out = w1.shape[0] * (w2.shape[0] if w2 is not None else state[f"{name}.lokr_w2_a"].shape[0])
            if tuple(w1.shape[:1]) != factorization(out, -1)[:1]:
                factor = max(w1.shape)
        conv = name in conv_names
        if conv not in ranks or (algo == "lokr" and state.get(f"{name}.lokr_w2_b") is not None):
            ranks[conv] = (rank, alpha if alpha is not None else float(rank))
    rank, alpha = ranks.get(False, ranks.get(True))
    conv_rank, conv_alpha = ranks.get(True, (0, 1.0))
    return LycorisSpec(rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                       algo=algo, factor=factor,
                       train_unet=any(k.startswith("lora_unet_") for k in state),
                       train_text_encoder=any(k.startswith("lora_te") for k in state))
