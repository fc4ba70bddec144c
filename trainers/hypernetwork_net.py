"""Hypernetworks as A1111 builds them: per context width, a pair of small MLPs (one for the
attention key, one for the value) that add a learned residual to the context.

Each MLP is `x + linear(x) * strength`, where `linear` is an nn.Sequential laid out exactly as
A1111 lays it out, so that `linear.{i}.weight/bias` land at A1111's indices. For each step
`j` of `layer_structure` (sizes dim*ls[j] -> dim*ls[j+1]) the Sequential gets, in order:

  Linear                                    always
  activation                                unless the function is "linear" (identity), or
                                            this is the output layer and activate_output is off
  LayerNorm(dim*ls[j+1])                    if add_layer_norm
  Dropout(p=dropout_structure[j+1])         if that value is > 0

e.g. [1, 2, 1] + relu + layer norm, activate_output off: 0 Linear, 1 ReLU, 2 LayerNorm,
3 Linear, 4 LayerNorm.

The names of activation functions are A1111's: "linear" is no activation, "swish" is
torch.nn.Hardswish (not SiLU; SiLU is "silu"), and every other name is the lower-cased class
name of a torch.nn activation module ("gelu", "mish", "hardswish", "prelu", ...).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from core.config import ConfigError

DEFAULT_SIZES = [768, 320, 640, 1280]
# Context widths of the SD families: 320/640/1280 are U-Net block widths (self-attention),
# 768 (SD1), 1024 (SD2) and 2048 (SDXL) text-context widths (cross-attention). A1111's page
# offers all but 2048; see trainers/hypernetwork_sizes.py.
KNOWN_SIZES = (320, 640, 768, 1024, 1280, 2048)
WEIGHT_INITS = ("Normal", "KaimingUniform", "KaimingNormal", "XavierUniform", "XavierNormal")


def _activation_table() -> dict[str, type[nn.Module]]:
    table: dict[str, type[nn.Module]] = {
        "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
        "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    }
    # A1111 adds every class of torch.nn.modules.activation under its lower-cased name. Left
    # out here: the ones that cannot be built without arguments or that change the width, which
    # fail in A1111 too.
    unusable = {"multiheadattention", "threshold", "glu"}
    for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation" and name.lower() not in unusable:
            table.setdefault(name.lower(), cls)
    return table


ACTIVATIONS: dict[str, type[nn.Module]] = _activation_table()
# the choices A1111's page shows first; the rest follow alphabetically
COMMON_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid")
ACTIVATION_CHOICES = list(COMMON_ACTIVATIONS) + sorted(set(ACTIVATIONS) - set(COMMON_ACTIVATIONS))


def parse_floats(text: str | Sequence[float], field_name: str) -> list[float]:
    """"1, 2, 1" -> [1.0, 2.0, 1.0]; ValueError naming `field_name` for anything else."""
    if not isinstance(text, str):
        items = list(text)
    else:
        if not text.strip():
            raise ConfigError(f"{field_name}: enter numbers separated by commas, e.g. 1, 2, 1")
        items = text.split(",")
    values = []
    for position, item in enumerate(items, 1):
        if isinstance(item, bool):
            raise ConfigError(f"{field_name}: {item!r} at position {position} is not a number")
        try:
            value = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            shown = item.strip() if isinstance(item, str) else item
            raise ConfigError(f"{field_name}: {shown!r} at position {position} is not a number "
                              "(use numbers separated by commas, e.g. 1, 2, 1)") from None
        if not math.isfinite(value):
            raise ConfigError(f"{field_name}: {value} at position {position} is not a finite "
                              "number")
        values.append(value)
    return values


def default_dropout_structure(layer_structure: Sequence[float], use_dropout: bool,
                              last_layer_dropout: bool) -> list[float]:
    """A1111's dropout values for files and settings that predate `dropout_structure`: 0.3 after
    every hidden layer but the last one, which gets 0.3 only with `last_layer_dropout`."""
    count = len(layer_structure)
    if not use_dropout:
        return [0.0] * count
    values = [0.0] + [0.3] * (count - 3)
    values.append(0.3 if last_layer_dropout else 0.0)
    values.append(0.0)
    return values


@dataclass
class HypernetworkSpec:
    name: str
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    activation_func: str = "linear"
    weight_initialization: str = "Normal"
    add_layer_norm: bool = False
    use_dropout: bool = False
    # one probability per entry of layer_structure; value j is the dropout after the layer that
    # outputs width dim*layer_structure[j] (value 0 is never used). None: derived from
    # use_dropout and last_layer_dropout as A1111 derives it.
    dropout_structure: list[float] | None = None
    activate_output: bool = False
    # only read when dropout_structure is None; files store dropout_structure[-2] != 0 (A1111)
    last_layer_dropout: bool = False
    step: int = 0
    sd_checkpoint: str | None = None  # short hash of the base model trained on
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None

    def dropout_values(self) -> list[float]:
        if self.dropout_structure is not None:
            return [float(v) for v in self.dropout_structure]
        return default_dropout_structure(self.layer_structure, self.use_dropout,
                                         self.last_layer_dropout)

    def validate(self, strict: bool = True) -> "HypernetworkSpec":
        """Raise ConfigError (a ValueError) naming every wrong field; return self.

        strict=False accepts what A1111 accepts in a file it loads: a dropout structure whose
        first or last value is not 0, or dropout values while use_dropout is off.
        """
        problems = self._problems(strict)
        if problems:
            raise ConfigError(problems)
        return self

    def _problems(self, strict: bool) -> list[str]:
        problems = []
        if not isinstance(self.name, str) or not self.name.strip():
            problems.append("name: must not be empty")
        problems += _size_problems(self.sizes)
        layers_ok = _number_list_ok(self.layer_structure)
        if not layers_ok:
            problems.append("layer_structure: must be a list of numbers, e.g. 1, 2, 1")
        elif len(self.layer_structure) < 2:
            problems.append("layer_structure: needs at least 2 values, e.g. 1, 2, 1")
        elif self.layer_structure[0] != 1 or self.layer_structure[-1] != 1:
            problems.append(f"layer_structure: must start and end with 1 (got "
                            f"{_show(self.layer_structure)})")
        else:
            problems += _width_problems(self.layer_structure, self.sizes)
        if self.activation_func not in ACTIVATIONS:
            problems.append(f"activation_func: unknown {self.activation_func!r}; choose from "
                            f"{', '.join(ACTIVATION_CHOICES)}")
        if self.weight_initialization not in WEIGHT_INITS:
            problems.append(f"weight_initialization: unknown {self.weight_initialization!r}; "
                            f"choose from {', '.join(WEIGHT_INITS)}")
        for name in ("add_layer_norm", "use_dropout", "activate_output", "last_layer_dropout"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}: must be true or false, not "
                                f"{getattr(self, name)!r}")
        if self.dropout_structure is not None and layers_ok:
            problems += _dropout_problems(self.dropout_structure, self.layer_structure,
                                          self.use_dropout, strict)
        if type(self.step) is not int or self.step < 0:
            problems.append(f"step: must be a whole number >= 0, not {self.step!r}")
        for name in ("sd_checkpoint", "sd_checkpoint_name", "optional_info"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                problems.append(f"{name}: must be text or empty, not {type(value).__name__}")
        return problems


def _show(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, (int, float)) else repr(v) for v in values)


def _number_list_ok(values) -> bool:
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values)


def _size_problems(sizes) -> list[str]:
    if not isinstance(sizes, (list, tuple)) or not sizes:
        return [f"sizes: choose at least one context width (e.g. "
                f"{', '.join(map(str, KNOWN_SIZES))})"]
    problems = []
    for size in sizes:
        if type(size) is not int or size <= 0:
            problems.append(f"sizes: {size!r} is not a positive whole number")
    if len(set(map(str, sizes))) != len(sizes):
        problems.append(f"sizes: {_show(sizes)} lists a width twice")
    return problems


def _width_problems(layer_structure: Sequence[float], sizes) -> list[str]:
    problems = []
    for position, factor in enumerate(layer_structure, 1):
        if factor <= 0:
            problems.append(f"layer_structure: {factor:g} at position {position} must be "
                            "greater than 0")
            continue
        for size in sizes if isinstance(sizes, (list, tuple)) else ():
            if type(size) is int and size > 0 and int(size * factor) < 1:
                problems.append(f"layer_structure: {factor:g} at position {position} makes a "
                                f"layer of 0 units for size {size}")
                break
    return problems


def _dropout_problems(dropout, layer_structure, use_dropout: bool, strict: bool) -> list[str]:
    if not _number_list_ok(dropout):
        return ["dropout_structure: must be a list of numbers, e.g. 0, 0.05, 0"]
    count = len(layer_structure)
    if len(dropout) != count:
        return [f"dropout_structure: needs {count} values, one per layer of the layer "
                f"structure {_show(layer_structure)} (got {len(dropout)})"]
    problems = []
    for position, value in enumerate(dropout, 1):
        if not 0 <= value < 1:
            problems.append(f"dropout_structure: {value:g} at position {position} is not a "
                            "probability in [0, 1)")
    if strict and not problems:
        if dropout[0] != 0 or dropout[-1] != 0:
            problems.append(f"dropout_structure: must start and end with 0, no dropout on the "
                            f"input or the output (got {_show(dropout)})")
        if any(dropout) and not use_dropout:
            problems.append("dropout_structure: has non-zero values but use_dropout is off; "
                            "turn use_dropout on or set the values to 0")
    return problems


def _init_weights(sequential: nn.Sequential, mode: str, activation: str) -> None:
    """A1111's initialisation. Only exact Linear and LayerNorm layers are touched; LayerNorm
    always gets the "Normal" treatment (weight ~ N(0, 0.01), bias 0), as in A1111."""
    nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
    for layer in sequential:
        if type(layer) not in (nn.Linear, nn.LayerNorm):
            continue
        weight, bias = layer.weight.data, layer.bias.data
        if mode == "Normal" or type(layer) is nn.LayerNorm:
            nn.init.normal_(weight, mean=0.0, std=0.01)
            nn.init.zeros_(bias)
        elif mode == "XavierUniform":
            nn.init.xavier_uniform_(weight)
            nn.init.zeros_(bias)
        elif mode == "XavierNormal":
            nn.init.xavier_normal_(weight)
            nn.init.zeros_(bias)
        elif mode == "KaimingUniform":
            nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity)
            nn.init.zeros_(bias)
        elif mode == "KaimingNormal":
            nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity)
            nn.init.zeros_(bias)
        else:
            raise ConfigError(f"weight_initialization: unknown {mode!r}; choose from "
                              f"{', '.join(WEIGHT_INITS)}")


class HypernetworkModule(nn.Module):
    """One MLP of a hypernetwork for context width `dim`: x + linear(x) * multiplier.

    While in training mode the multiplier is ignored (always 1), as in A1111.
    """

    def __init__(self, dim: int, spec: HypernetworkSpec, init_weights: bool = True):
        super().__init__()
        self.dim = dim
        self.multiplier = 1.0
        widths = [int(dim * factor) for factor in spec.layer_structure]
        dropout = spec.dropout_values()
        activation = spec.activation_func or "linear"
        last = len(widths) - 2
        layers: list[nn.Module] = []
        for j in range(len(widths) - 1):
            layers.append(nn.Linear(widths[j], widths[j + 1]))
            if activation != "linear" and (j < last or spec.activate_output):
                layers.append(ACTIVATIONS[activation]())
            if spec.add_layer_norm:
                layers.append(nn.LayerNorm(widths[j + 1]))
            if dropout[j + 1] > 0:
                layers.append(nn.Dropout(p=dropout[j + 1]))
        self.linear = nn.Sequential(*layers)
        if init_weights:
            _init_weights(self.linear, spec.weight_initialization, activation)

    def forward(self, x: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
        scale = 1.0 if self.training else (self.multiplier if multiplier is None else multiplier)
        return x + self.linear(x) * scale


class Hypernetwork:
    """A spec and, for each enabled context width, a (key, value) pair of HypernetworkModule.

    The spec is validated first (ConfigError); strict=False is for files, see validate().
    Like A1111's, a new or loaded hypernetwork starts in eval mode with requires_grad off;
    call train() before training (it turns requires_grad on) and eval() after.
    """

    def __init__(self, spec: HypernetworkSpec, init_weights: bool = True, strict: bool = True):
        spec.validate(strict=strict)
        self.spec = spec
        self.layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {
            size: (HypernetworkModule(size, spec, init_weights),
                   HypernetworkModule(size, spec, init_weights))
            for size in spec.sizes}
        self.eval()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def step(self) -> int:
        return self.spec.step

    @step.setter
    def step(self, value: int) -> None:
        self.spec.step = int(value)

    def modules(self) -> Iterator[HypernetworkModule]:
        for pair in self.layers.values():
            yield from pair

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules() for p in module.parameters()]

    def train(self, mode: bool = True) -> "Hypernetwork":
        for module in self.modules():
            module.train(mode)
            module.requires_grad_(mode)
        return self

    def eval(self) -> "Hypernetwork":
        return self.train(False)

    @property
    def training(self) -> bool:
        return any(module.training for module in self.modules())

    def set_strength(self, strength: float) -> "Hypernetwork":
        """The multiplier used in eval mode when none is passed explicitly."""
        for module in self.modules():
            module.multiplier = float(strength)
        return self

    def to(self, *args, **kwargs) -> "Hypernetwork":
        for module in self.modules():
            module.to(*args, **kwargs)
        return self

    def get(self, width: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        return self.layers.get(width)
