"""LoRA (and LoCon) adapters on a diffusers U-Net and a transformers CLIP text model, via peft.

Which modules get an adapter follows kohya sd-scripts' `networks/lora.py`, so the saved file has
exactly the keys A1111, ComfyUI, Forge and diffusers expect:

- U-Net: every nn.Linear and nn.Conv2d inside a `Transformer2DModel` (attn1/attn2 to_q, to_k,
  to_v, to_out.0; ff.net.0.proj, ff.net.2; proj_in, proj_out). A Conv2d with a kernel bigger
  than 1x1 gets an adapter only with `conv_rank > 0`.
- With `conv_rank > 0` (kohya's `conv_dim` network arg, "LoCon") also every nn.Linear and
  nn.Conv2d inside `ResnetBlock2D`, `Downsample2D` and `Upsample2D`: the 3x3 convs (conv1,
  conv2, downsamplers.0.conv, upsamplers.0.conv) get `conv_rank`/`conv_alpha`, while the 1x1
  conv_shortcut and the time_emb_proj Linear get `rank`/`alpha`, as in kohya. conv_in and
  conv_out are in none of these blocks and are never adapted.
- Text encoder: the Linear layers of `CLIPAttention` (q_proj, k_proj, v_proj, out_proj) and
  `CLIPMLP` (fc1, fc2).

Names are `lora_unet_<path>` / `lora_te_<path>` with every "." of the module path turned into
"_". SDXL (kohya's sdxl_train_network): the two text encoders are `lora_te1_` / `lora_te2_`, and
the U-Net path is the original (SGM) one, `input_blocks.4.1.transformer_blocks.0.attn1.to_q`
rather than diffusers' `down_blocks.1.attentions.0...`, as kohya's SDXL U-Net names its modules. transformers 5's CLIPTextModel has no `text_model` level in its module paths
(`encoder.layers.0...`), yet every loader expects `lora_te_text_model_encoder_layers_0_...`,
so the text-encoder path gets `text_model.` put in front when the model lacks that level.

Initialisation is kohya's (and peft's default): down (lora_A) Kaiming-uniform with a=sqrt(5),
up (lora_B) zeros, so a fresh network leaves the output unchanged; scale = alpha / rank; an
alpha of 0 means alpha = rank (kohya). Conv adapters are kohya's shape: down is a Conv2d with
the base layer's kernel, stride and padding, up a 1x1 Conv2d. `dropout` is peft's
`lora_dropout` (applied to the adapter's input; kohya's `network_dropout` acts after down).

With `dora` (LyCORIS's `dora_wd`) every adapter is peft's DoRA (`use_dora=True`): a magnitude
per output row beside down / up, saved as `<name>.dora_scale` (trainers/formats/dora.py). Its
strength interpolates the layer's weight, W + s * (W' - W), as A1111 and ComfyUI apply a file;
peft's own scale would not give the base model at 0. `dora_on_output = False` puts the norm on
the input axis instead (LyCORIS `wd_on_output = False`; trainers/dora_input_axis.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import torch
from torch import nn

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
UNET_TARGET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_TARGET_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
DIFFERENT_CONFIG = "a resume state from a different network config"


class LoraStateError(ValueError):
    """A state dict that does not fit this network (missing/unexpected keys, shapes, alphas)."""


@dataclass
class LoraSpec:
    rank: int = 8          # kohya network_dim
    alpha: float = 1.0     # kohya network_alpha; 0 means alpha = rank
    conv_rank: int = 0     # kohya conv_dim; 0 = no LoCon (3x3 conv) adapters
    conv_alpha: float = 1.0
    train_unet: bool = True
    train_text_encoder: bool = True
    dropout: float = 0.0
    # block kind -> kohya index list ("all", "none", "0,2,4-7"); the layout's kinds (Flux.1:
    # "double", "single"); an empty dict trains every block
    blocks: Mapping[str, str] = field(default_factory=dict)
    # kohya name -> (rank, alpha) of a layer whose rank differs from the rest (a file resized
    # per layer, as kohya's dynamic resize writes it)
    ranks: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    # layer type (the layout's layer_types, kohya's type_dims) -> (rank, alpha or None: the
    # network's); rank 0 leaves that type untrained
    type_ranks: Mapping[str, tuple[int, float | None]] = field(default_factory=dict)
    dora: bool = False  # DoRA: peft's use_dora, a trained magnitude per output row
    dora_on_output: bool = True  # False: per input column (LyCORIS wd_on_output=False)

    def validate(self) -> None:
        if int(self.rank) < 1:
            raise ValueError(f"LoRA rank (network dim) must be at least 1, got {self.rank}")
        if int(self.conv_rank) < 0:
            raise ValueError(f"LoRA conv rank (conv dim) must be 0 or more, got {self.conv_rank}")
        if self.alpha < 0 or self.conv_alpha < 0:
            raise ValueError("LoRA alpha and conv alpha must not be negative")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("LoRA needs the U-Net, the text encoder or both to train")

    @property
    def uses_conv(self) -> bool:
        return int(self.conv_rank) > 0


@dataclass(frozen=True)
class LoraTarget:
    name: str    # kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    path: str    # module path inside its model, e.g. down_blocks.0.attentions.0.proj_in
    part: str    # "unet" or "text_encoder"
    conv: bool   # a Conv2d with a kernel bigger than 1x1 (rank conv_rank, alpha conv_alpha)


def is_sdxl_unet(unet: nn.Module) -> bool:
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def unet_kohya_path(unet: nn.Module):
    """path -> the path kohya names: diffusers' for SD1/SD2, the original layout's for SDXL."""
    if not is_sdxl_unet(unet):
        return lambda path: path
    from trainers.formats.sd_checkpoint import original_unet_path
    return lambda path: original_unet_path(path, unet.config)


def text_encoder_prefixes(text_encoder_2) -> dict[str, str]:
    """part -> kohya prefix: `lora_te` alone, `lora_te1` / `lora_te2` with SDXL's two encoders."""
    if text_encoder_2 is None:
        return {"text_encoder": TEXT_ENCODER_PREFIX}
    return {"text_encoder": TEXT_ENCODER_PREFIX + "1", "text_encoder_2": TEXT_ENCODER_PREFIX + "2"}


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path}".replace(".", "_")


def text_encoder_kohya_path(text_encoder: nn.Module, path: str) -> str:
    """The module path as kohya writes it: always with the `text_model.` level."""
    if isinstance(getattr(text_encoder, "text_model", None), nn.Module):
        return path
    return f"text_model.{path}" if path else "text_model"


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def _is_big_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def find_targets(model: nn.Module, part: str, conv: bool,
                 prefix: str | None = None) -> list[LoraTarget]:
    """The modules kohya's LoRA adapts in `model` ("unet", "text_encoder" or "text_encoder_2"),
    in model order; `prefix` overrides the text encoder's (`lora_te1` / `lora_te2` for SDXL)."""
    if part == "unet":
        blocks = UNET_TARGET_BLOCKS + (UNET_CONV_TARGET_BLOCKS if conv else ())
        prefix, to_kohya = UNET_PREFIX, unet_kohya_path(model)
    elif part in ("text_encoder", "text_encoder_2"):
        blocks = TEXT_ENCODER_TARGET_BLOCKS
        prefix = prefix or TEXT_ENCODER_PREFIX
        to_kohya = (lambda path: text_encoder_kohya_path(model, path))
    else:
        raise ValueError(f"unknown model part {part!r}")
    targets: dict[str, LoraTarget] = {}
    for block_path, block in model.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child_path, child in block.named_modules():
            if not child_path or not _is_adaptable(child):
                continue
            big = _is_big_conv(child)
            if big and not conv:
                continue  # kohya skips kxk convs without conv_dim
            path = f"{block_path}.{child_path}" if block_path else child_path
            targets.setdefault(path, LoraTarget(kohya_name(prefix, to_kohya(path)), path, part, big))
    return list(targets.values())


class UnetLayout:
    """Where kohya's LoRA goes in an SD-family model and how its file names them: the U-Net's
    transformer (and, for LoCon, ResNet) blocks, CLIP text encoders as `lora_te` / `lora_te1`,
    `lora_te2`; one file key per adapted module. A family with another denoiser names its own
    layout (`Family.lora_layout`, e.g. trainers/flux_lora.py)."""

    trains_text_encoder = True  # False: the family has no text-encoder LoRA (text_parts is {})
    block_kinds: tuple[str, ...] = ()  # the kinds of block a LoRA can be limited to by index
    layer_types: tuple[str, ...] = ()  # the kinds of layer a rank can be set for (type_dims)

    def layer_type(self, name: str) -> str | None:
        """The layer type (one of layer_types) of a target's kohya name."""
        return None

    def type_ranks_in(self, state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, None]]:
        """The layer types a file leaves out (rank 0), for building a network that fits it."""
        present = {self.layer_type(key.split(".", 1)[0]) for key in state}
        return {kind: (0, None) for kind in self.layer_types if kind not in present}

    def with_type_ranks(self, targets: list[LoraTarget], spec: "LoraSpec"
                        ) -> tuple[list[LoraTarget], dict[str, tuple[int, float]]]:
        """The targets whose type is not set to rank 0, and spec.ranks plus each typed
        target's own (rank, alpha)."""
        unknown = [t for t in spec.type_ranks if t not in self.layer_types]
        if unknown:
            raise ValueError(f"LoRA: this model has no {', '.join(unknown)} layers to set a "
                             "rank for")
        ranks, kept = dict(spec.ranks), []
        for target in targets:
            found = spec.type_ranks.get(self.layer_type(target.name) or "")
            if found is None or target.name in spec.ranks:
                kept.append(target)
            elif found[0] > 0:
                kept.append(target)
                ranks[target.name] = (found[0], spec.alpha if found[1] is None else found[1])
        if not kept:
            raise ValueError("LoRA: the ranks per layer type leave no layer to train")
        return kept, ranks

    def denoiser_targets(self, model: nn.Module, conv: bool) -> list[LoraTarget]:
        return find_targets(model, "unet", conv)

    def select(self, targets: list[LoraTarget], blocks: Mapping[str, str],
               model: nn.Module) -> list[LoraTarget]:
        """The targets inside the blocks `blocks` chooses (LoraSpec.blocks)."""
        if any(kind not in self.block_kinds for kind in blocks):
            raise ValueError(f"LoRA: this model has no {', '.join(blocks)} blocks to choose")
        return targets

    def blocks_in(self, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """The block choice a file was trained with (for building a network that fits it)."""
        return {}

    def text_parts(self, text_encoder, text_encoder_2) -> dict[str, tuple[nn.Module, str]]:
        """part -> (text encoder, kohya prefix) for the encoders a text-encoder LoRA trains."""
        prefixes = text_encoder_prefixes(text_encoder_2)
        parts = {"text_encoder": (text_encoder, prefixes["text_encoder"])}
        if text_encoder_2 is not None:
            parts["text_encoder_2"] = (text_encoder_2, prefixes["text_encoder_2"])
        return parts

    def to_file(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The network's per-module tensors -> the file's keys (the same here)."""
        return state

    def from_file(self, state: Mapping[str, torch.Tensor],
                  out_sizes: Mapping[str, int]) -> Mapping[str, torch.Tensor]:
        """A file's keys -> the network's; `out_sizes`: each target's output features."""
        return state


UNET_LAYOUT = UnetLayout()


def _peft_layer_class():
    from peft.tuners.tuners_utils import BaseTunerLayer
    return BaseTunerLayer


def _parent_and_attr(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def _kohya_alpha(alpha: float, rank: int) -> float:
    return float(rank) if not alpha else float(alpha)


class _Part:
    """The adapters injected into one model, and what is needed to take them out again."""

    def __init__(self, model: nn.Module, part: str, targets: list[LoraTarget], spec: LoraSpec,
                 adapter_name: str, param_dtype: torch.dtype | None):
        from peft import LoraConfig, inject_adapter_in_model

        self.model, self.part, self.targets, self.adapter = model, part, targets, adapter_name
        tuner_layer = _peft_layer_class()
        if any(isinstance(m, tuner_layer) for m in model.modules()):
            raise RuntimeError(f"the {part} already carries peft adapters; remove them (or the "
                               "previous LoRA network) before adding a new one")
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.had_peft_config = "peft_config" in vars(model)
        self.old_peft_config = vars(model).get("peft_config")
        self.had_hf_flag = "_hf_peft_config_loaded" in vars(model)
        self.old_hf_flag = vars(model).get("_hf_peft_config_loaded")

        rank, alpha = int(spec.rank), _kohya_alpha(spec.alpha, spec.rank)
        conv_rank = int(spec.conv_rank)
        conv_alpha = _kohya_alpha(spec.conv_alpha, conv_rank) if conv_rank else 0.0
        own = {t.name: (int(r), _kohya_alpha(a, int(r))) for t in targets
               if (found := spec.ranks.get(t.name)) is not None for r, a in [found]}
        self.rank_alpha = {t.name: own.get(t.name) or ((conv_rank, conv_alpha) if t.conv
                                                      else (rank, alpha)) for t in targets}
        special = {re.escape(t.path): self.rank_alpha[t.name] for t in targets
                   if t.conv or t.name in own}
        self.dora = bool(spec.dora)
        self.dora_strength = _Strength()
        self.hooks = []
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=float(spec.dropout), bias="none",
            init_lora_weights=True, target_modules=[t.path for t in targets], use_dora=self.dora,
            rank_pattern={p: r for p, (r, _) in special.items()},
            alpha_pattern={p: a for p, (_, a) in special.items()})
        try:
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
        except BaseException:
            self.remove()
            raise
        self.layers: dict[str, nn.Module] = {}
        for target in targets:
            layer = model.get_submodule(target.path)
            if not isinstance(layer, tuner_layer) or adapter_name not in layer.lora_A:
                self.remove()
                raise RuntimeError(f"peft did not adapt {target.path} in the {part}")
            r, a = self.rank_alpha[target.name]
            if layer.r[adapter_name] != r or float(layer.lora_alpha[adapter_name]) != a:
                self.remove()
                raise RuntimeError(f"peft gave {target.path} rank {layer.r[adapter_name]}, "
                                   f"alpha {layer.lora_alpha[adapter_name]}; expected {r}, {a}")
            self.layers[target.name] = layer
            if self.dora and not spec.dora_on_output:
                from trainers.dora_input_axis import InputAxisDora
                layer.lora_magnitude_vector[adapter_name] = InputAxisDora(layer.get_base_layer())
            if self.dora:
                self.hooks.append(layer.lora_magnitude_vector[adapter_name]
                                  .register_forward_hook(self.dora_strength))
        for layer in self.layers.values():
            for param in self._adapter_params(layer):
                if param_dtype is not None and param.dtype != param_dtype:
                    param.data = param.data.to(param_dtype)
                param.requires_grad_(True)
        # Everything that is not ours stays frozen; peft froze it already, make sure of it.
        ours = {id(p) for p in self.parameters()}
        for param in model.parameters():
            if id(param) not in ours:
                param.requires_grad_(False)

    def _adapter_params(self, layer: nn.Module) -> list[nn.Parameter]:
        params = [layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight]
        return params + ([layer.lora_magnitude_vector[self.adapter].weight] if self.dora else [])

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in self._adapter_params(layer)]

    def down_up(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[name]
        return layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight

    def magnitude(self, name: str) -> nn.Parameter | None:
        """DoRA's magnitude of module `name` (peft's shape: [out], a conv's [1, out, 1, 1])."""
        return self.layers[name].lora_magnitude_vector[self.adapter].weight if self.dora else None

    def set_strength(self, multiplier: float) -> None:
        if self.dora:
            self.dora_strength.value = float(multiplier)
            return
        for layer in self.layers.values():
            layer.set_scale(self.adapter, float(multiplier))

    def remove(self) -> None:
        tuner_layer = _peft_layer_class()
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for target in self.targets:
            parent, attr = _parent_and_attr(self.model, target.path)
            layer = getattr(parent, attr)
            if not isinstance(layer, tuner_layer):
                continue
            others = [name for name in getattr(layer, "lora_A", {}) if name != self.adapter]
            if others:
                layer.delete_adapter(self.adapter)
            else:
                setattr(parent, attr, layer.get_base_layer())
        state = vars(self.model)
        if self.had_peft_config:
            config = dict(self.old_peft_config or {})
            config.pop(self.adapter, None)
            state["peft_config"] = config
        else:
            state.pop("peft_config", None)
        if self.had_hf_flag:
            state["_hf_peft_config_loaded"] = self.old_hf_flag
        else:
            state.pop("_hf_peft_config_loaded", None)
        for name, param in self.model.named_parameters():
            if name in self.requires_grad:
                param.requires_grad_(self.requires_grad[name])
        self.layers = {}


class _Strength:
    """Forward hook on a DoRA module: its output, W' x - W x, times the strength."""

    def __init__(self):
        self.value = 1.0

    def __call__(self, module, args, output):
        return None if self.value == 1.0 else output * self.value


class AdaptedParts:
    """What a network injected into the U-Net / denoiser and text encoders trains, read from
    its `_parts` (part name -> an object with `targets` and `parameters()`)."""
    _parts: dict

    @property
    def targets(self) -> list[LoraTarget]:
        return [t for part in self._parts.values() for t in part.targets]

    def unet_parameters(self) -> list[nn.Parameter]:
        part = self._parts.get("unet")
        return part.parameters() if part else []

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        return [p for name in ("text_encoder", "text_encoder_2") if name in self._parts
                for p in self._parts[name].parameters()]

    def parameters(self) -> list[nn.Parameter]:
        return self.unet_parameters() + self.text_encoder_parameters()


class LoraNetwork(AdaptedParts):
    """kohya-compatible LoRA injected (through peft) into a U-Net and a CLIP text encoder.

    The base modules stay in place inside peft wrappers; their weights are never changed.
    `remove()` puts the original module objects back, so a cached base model can be reused.
    """

    def __init__(self, unet: nn.Module | None, text_encoder: nn.Module | None, spec: LoraSpec,
                 adapter_name: str = "danlu", param_dtype: torch.dtype | None = torch.float32,
                 text_encoder_2: nn.Module | None = None, layout: UnetLayout = UNET_LAYOUT):
        spec.validate()
        if spec.dora and type(layout) is not UnetLayout:
            raise ValueError("DoRA trains the SD families' U-Net and CLIP encoders only")
        self.spec = spec
        self.layout = layout
        self.adapter_name = adapter_name
        self.strength = 1.0
        self._parts: dict[str, _Part] = {}
        wanted = []
        if spec.train_unet:
            if unet is None:
                raise ValueError("LoRA: train_unet is set but no U-Net was given")
            wanted.append(("unet", unet, None))
        if spec.train_text_encoder:
            if text_encoder is None:
                raise ValueError("LoRA: train_text_encoder is set but no text encoder was given")
            for part, (model, prefix) in layout.text_parts(text_encoder, text_encoder_2).items():
                wanted.append((part, model, prefix))
        try:
            for part, model, prefix in wanted:
                part_spec = spec
                if part == "unet":
                    targets = layout.select(layout.denoiser_targets(model, spec.uses_conv),
                                            spec.blocks, model)
                    if spec.type_ranks:
                        targets, ranks = layout.with_type_ranks(targets, spec)
                        part_spec = replace(spec, ranks=ranks)
                else:
                    targets = find_targets(model, part, spec.uses_conv, prefix)
                if not targets:
                    raise ValueError(f"LoRA: found no module to adapt in the {part} "
                                     f"({type(model).__name__})")
                self._parts[part] = _Part(model, part, targets, part_spec, adapter_name,
                                          param_dtype)
        except BaseException:
            self.remove()
            raise

    # ---- what is trained: AdaptedParts ----------------------------------------------

    def rank_alpha(self, name: str) -> tuple[int, float]:
        for part in self._parts.values():
            if name in part.rank_alpha:
                return part.rank_alpha[name]
        raise KeyError(name)

    def set_strength(self, multiplier: float) -> None:
        """Scale the adapters' effect (1 = as trained, 0 = the base model's output exactly)."""
        self.strength = float(multiplier)
        for part in self._parts.values():
            part.set_strength(multiplier)

    # ---- kohya state dict ------------------------------------------------------------
    def _entries(self):
        for part in self._parts.values():
            for target in part.targets:
                down, up = part.down_up(target.name)
                yield target.name, down, up, part.rank_alpha[target.name][1]

    def _magnitudes(self):
        """(kohya name, magnitude, the file's dora_scale shape) of each DoRA module."""
        from trainers.formats.dora import file_shape
        for part in self._parts.values():
            for target in part.targets:
                magnitude = part.magnitude(target.name)
                if magnitude is not None:
                    weight = part.layers[target.name].get_base_layer().weight
                    shape = (file_shape(weight.shape) if self.spec.dora_on_output
                             else tuple(magnitude.shape))  # the input-axis module's own
                    yield target.name, magnitude, shape

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` for every key of
        the file (the layout's: one per target, or fused as the family's file names them)."""
        return self.layout.to_file(self.module_state_dict(dtype))

    def module_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The same keys for every target (adapted module) before the layout fuses any."""
        state: dict[str, torch.Tensor] = {}
        for name, down, up, alpha in self._entries():
            state[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous().clone()
            state[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous().clone()
            state[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        for name, magnitude, shape in self._magnitudes():  # LyCORIS's output-axis dora_scale
            state[f"{name}.dora_scale"] = magnitude.detach().to("cpu", dtype).reshape(shape).clone()
        return state

    def load_kohya_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy a kohya state dict into the adapters; it must fit exactly (strict)."""
        try:
            state = self.layout.from_file(
                state, {name: up.shape[0] for name, _down, up, _alpha in self._entries()})
        except ValueError as error:
            raise LoraStateError(f"LoRA weights do not fit this network: {error}") from None
        expected: dict[str, tuple[tuple[int, ...], torch.Tensor | None]] = {}
        for name, down, up, _alpha in self._entries():
            expected[f"{name}.lora_down.weight"] = (tuple(down.shape), down)
            expected[f"{name}.lora_up.weight"] = (tuple(up.shape), up)
            expected[f"{name}.alpha"] = ((), None)
        for name, magnitude, shape in self._magnitudes():
            expected[f"{name}.dora_scale"] = (shape, magnitude)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_some(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
        shapes = [f"{key}: file {list(state[key].shape)}, network {list(shape)}"
                  for key, (shape, _) in expected.items()
                  if key in state and tuple(state[key].shape) != shape
                  and not (shape == () and state[key].numel() == 1)]
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches ({_some(shapes)})")
            if any(".dora_scale:" in text for text in shapes):
                axes = ("output", "input") if self.spec.dora_on_output else ("input", "output")
                problems.append("the file's dora_scale is on the {1} axis, this network's on the "
                                "{0} (LyCORIS wd_on_output)".format(*axes))
        alphas = []
        for name, _down, _up, alpha in self._entries():
            key = f"{name}.alpha"
            if key in state and state[key].numel() == 1 and \
                    abs(float(state[key].float().reshape(())) - alpha) > 1e-3 * max(1.0, abs(alpha)):
                alphas.append(f"{key}: file {float(state[key].float().reshape(())):g}, network {alpha:g}")
        if alphas:
            problems.append(f"{len(alphas)} alpha mismatches ({_some(alphas)})")
        if problems:
            dora = ", DoRA" if self.spec.dora else ""
            raise LoraStateError(f"LoRA weights do not fit this network ({DIFFERENT_CONFIG}; "
                                 f"rank {self.spec.rank}, conv rank {self.spec.conv_rank}{dora}): "
                                 + "; ".join(problems))
        with torch.no_grad():
            for key, (_shape, param) in expected.items():
                if param is not None:  # dora_scale [out, 1] -> peft's [out] / [1, out, 1, 1]
                    param.copy_(state[key].reshape(param.shape).to(param.device, param.dtype))

    # ---- teardown -------------------------------------------------------------------
    def remove(self) -> None:
        """Take the adapters out and restore the base modules (and their requires_grad flags)."""
        for part in reversed(list(self._parts.values())):
            part.remove()
        self._parts = {}

    def __enter__(self) -> "LoraNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _some(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")


# ---- merging a kohya state dict into plain modules (tests, extraction, baking) ------------
def kohya_module_map(unet: nn.Module | None, text_encoder: nn.Module | None,
                     text_encoder_2: nn.Module | None = None) -> dict[str, nn.Module]:
    """kohya name -> Linear/Conv2d for every such module of the given models."""
    names: dict[str, nn.Module] = {}
    if unet is not None:
        to_kohya = unet_kohya_path(unet)
        for path, module in unet.named_modules():
            if path and _is_adaptable(module) and (name := _unet_name(to_kohya, path)):
                names[name] = module
    prefixes = text_encoder_prefixes(text_encoder_2)
    for part, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            for path, module in model.named_modules():
                if path and _is_adaptable(module):
                    names[kohya_name(prefixes[part], text_encoder_kohya_path(model, path))] = module
    return names


def _unet_name(to_kohya, path: str) -> str | None:
    try:
        return kohya_name(UNET_PREFIX, to_kohya(path))
    except ValueError:  # a module the original layout has no name for
        return None


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None,
               multiplier: float = 1.0) -> torch.Tensor:
    """multiplier * (alpha / rank) * up @ down, shaped like the base weight (float32)."""
    down, up = down.float(), up.float()
    rank = down.shape[0]
    scale = multiplier * ((float(alpha) if alpha else rank) / rank)
    if down.dim() == 2:
        return scale * (up @ down)
    # conv: up is [out, r, 1, 1]; down is [r, in, kh, kw]
    return scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)


def merge_into(unet: nn.Module | None, text_encoder: nn.Module | None,
               state: Mapping[str, torch.Tensor], multiplier: float = 1.0,
               text_encoder_2: nn.Module | None = None) -> list[str]:
    """Add multiplier * (alpha/r) * up @ down to each named module's weight, in place (a DoRA
    module: multiplier * (W' - W), trainers/formats/dora.py).

    Returns the merged kohya names; raises LoraStateError naming keys that match no module.
    """
    modules = kohya_module_map(unet, text_encoder, text_encoder_2)
    names = lora_names(state)
    unknown = [n for n in names if n not in modules or f"{n}.lora_down.weight" not in state
               or f"{n}.lora_up.weight" not in state]
    if unknown:
        raise LoraStateError(f"LoRA keys that match no module of this model: {_some(unknown)}")
    with torch.no_grad():
        for name in names:
            module = modules[name]
            alpha = state.get(f"{name}.alpha")
            scale = state.get(f"{name}.dora_scale")
            delta = lora_delta(state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"],
                               None if alpha is None else float(alpha.float().reshape(())),
                               multiplier if scale is None else 1.0)
            if tuple(delta.shape) != tuple(module.weight.shape):
                raise LoraStateError(f"{name}: LoRA delta {list(delta.shape)} does not fit the "
                                     f"weight {list(module.weight.shape)}")
            if scale is not None:
                from trainers.formats.dora import dora_delta
                delta = dora_delta(module.weight, delta, scale, multiplier)
            module.weight.add_(delta.to(module.weight.device, module.weight.dtype))
    return names


def lora_names(state: Iterable[str]) -> list[str]:
    """The distinct module names in a kohya state dict's keys."""
    return sorted({key.split(".", 1)[0] for key in state})
