"""Optimizer name -> factory(param_groups, lr, **args), with kohya sd-scripts' names and the
arguments it passes. Optional packages are detected; asking for a missing one is an error that
names the package.

- AdamW: torch.optim.AdamW(params, lr, **args), with torch's fused kernel unless the args say
  `fused` or `foreach`.
- AdamW8bit, PagedAdamW8bit, PagedAdamW, PagedAdamW32bit, Lion8bit, PagedLion8bit, SGDNesterov8bit:
  bitsandbytes' classes of those names (SGDNesterov8bit is SGD8bit with nesterov=True and
  momentum 0.9 unless given, as kohya passes them; bitsandbytes ignores nesterov). Optional: they need a usable bitsandbytes
  build. Paged state lives in CUDA unified memory and moves to CPU RAM under GPU memory
  pressure; without a GPU it is an ordinary buffer.
- Lion: lion_pytorch.Lion (kohya's choice of Lion implementation).
- Prodigy: prodigyopt.Prodigy; like kohya, warns when lr <= 0.1 (Prodigy wants about 1.0).
- Adafactor: transformers.optimization.Adafactor. With relative_step=False (Danlu's default,
  and what kohya_ss users pass: scale_parameter=False, relative_step=False, warmup_init=False)
  the learning rate comes from the schedule. relative_step=True (kohya's default when unset)
  makes Adafactor compute its own rate from its step count: lr is passed as None and the
  groups' lr entries are removed, as kohya does; warmup_init=True implies relative_step=True.
- SGDNesterov: torch.optim.SGD(nesterov=True, momentum=0.9 unless given)."""
from __future__ import annotations

import ast
import importlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable

import torch

from core.config import ConfigError


class OptimizerError(ConfigError):
    pass


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Callable[..., torch.optim.Optimizer]
    package: str | None  # import name of the optional package, None for torch/transformers
    pip_name: str | None
    help: str


def _groups(params) -> list:
    params = list(params)
    if not params:
        raise OptimizerError("optimizer: there are no trainable parameters")
    return params


def _adamw(params, lr, **args):
    if "fused" not in args and "foreach" not in args:
        # torch's fused kernel does the whole update in one pass over each tensor (on CPU
        # torch otherwise loops tensor by tensor, ~3x slower for a full U-Net); same numbers
        params = list(params)
        try:
            return torch.optim.AdamW(params, lr=lr, fused=True, **args)
        except (RuntimeError, ValueError):  # a device or dtype the fused kernel lacks
            pass
    return torch.optim.AdamW(params, lr=lr, **args)


def _bitsandbytes(name: str, class_name: str, **defaults):
    """A factory for bitsandbytes' `class_name` under kohya's optimizer `name`; `defaults` are
    kohya's (the user's optimizer_args win)."""
    def build(params, lr, **args):
        bnb = _require(name)
        return getattr(bnb.optim, class_name)(params, lr=lr, **{**defaults, **args})
    return build


def _sgd_nesterov8bit(params, lr, **args):
    args.setdefault("momentum", 0.9)
    return _bitsandbytes("SGDNesterov8bit", "SGD8bit", nesterov=True)(params, lr, **args)


def _lion(params, lr, **args):
    return _require("Lion").Lion(params, lr=lr, **args)


def _prodigy(params, lr, **args):
    return _require("Prodigy").Prodigy(params, lr=lr, **args)


def _sgd_nesterov(params, lr, **args):
    args.setdefault("momentum", 0.9)
    return torch.optim.SGD(params, lr=lr, nesterov=True, **args)


ADAFACTOR_DEFAULTS = {"scale_parameter": False, "relative_step": False, "warmup_init": False}


def _adafactor(params, lr, **args):
    from transformers.optimization import Adafactor
    args = {**ADAFACTOR_DEFAULTS, **args}
    if args.get("warmup_init"):
        args["relative_step"] = True
    if args["relative_step"]:
        lr = None
        params = [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g
                  for g in params]
    return Adafactor(params, lr=lr, **args)


OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in [
    OptimizerSpec("AdamW", _adamw, None, None, "torch AdamW"),
    OptimizerSpec("AdamW8bit", _bitsandbytes("AdamW8bit", "AdamW8bit"), "bitsandbytes",
                  "bitsandbytes", "8-bit AdamW from bitsandbytes: less memory for optimizer state"),
    OptimizerSpec("PagedAdamW8bit", _bitsandbytes("PagedAdamW8bit", "PagedAdamW8bit"),
                  "bitsandbytes", "bitsandbytes", "8-bit AdamW whose state pages out to CPU RAM "
                  "when the GPU runs short (bitsandbytes)"),
    OptimizerSpec("PagedAdamW", _bitsandbytes("PagedAdamW", "PagedAdamW"), "bitsandbytes",
                  "bitsandbytes", "AdamW (32-bit state) that pages out to CPU RAM when the GPU "
                  "runs short (bitsandbytes)"),
    OptimizerSpec("PagedAdamW32bit", _bitsandbytes("PagedAdamW32bit", "PagedAdamW32bit"),
                  "bitsandbytes", "bitsandbytes", "the same as PagedAdamW (kohya's other name)"),
    OptimizerSpec("Lion8bit", _bitsandbytes("Lion8bit", "Lion8bit"), "bitsandbytes",
                  "bitsandbytes", "8-bit Lion from bitsandbytes"),
    OptimizerSpec("PagedLion8bit", _bitsandbytes("PagedLion8bit", "PagedLion8bit"),
                  "bitsandbytes", "bitsandbytes", "8-bit Lion that pages out to CPU RAM when "
                  "the GPU runs short (bitsandbytes)"),
    OptimizerSpec("SGDNesterov8bit", _sgd_nesterov8bit, "bitsandbytes", "bitsandbytes",
                  "8-bit SGD with momentum 0.9 unless momentum= is given (bitsandbytes takes "
                  "kohya's nesterov=True but runs plain momentum)"),
    OptimizerSpec("Lion", _lion, "lion_pytorch", "lion-pytorch",
                  "Lion (sign momentum); use a learning rate 3-10x lower than AdamW's"),
    OptimizerSpec("Prodigy", _prodigy, "prodigyopt", "prodigyopt",
                  "Prodigy: finds its own step size; set the learning rate to about 1.0"),
    OptimizerSpec("Adafactor", _adafactor, None, None,
                  "transformers Adafactor (relative_step=False: the schedule sets the rate)"),
    OptimizerSpec("SGDNesterov", _sgd_nesterov, None, None,
                  "SGD with Nesterov momentum (0.9 unless momentum= is given)"),
]}


def _lookup(name: str) -> OptimizerSpec:
    for key, spec in OPTIMIZERS.items():
        if key.lower() == str(name).strip().lower():
            return spec
    raise OptimizerError(f"optimizer_type: unknown optimizer {name!r}; known: "
                         f"{', '.join(OPTIMIZERS)}")


@lru_cache(maxsize=None)
def _problem(package: str) -> str | None:
    """None when the package imports and works here, else why not."""
    try:
        module = importlib.import_module(package)
    except Exception as error:  # ImportError, or a native library that fails to load
        if isinstance(error, ImportError):
            return f"the {package} package is not installed"
        return f"the {package} package does not load here ({type(error).__name__}: {error})"
    if package == "bitsandbytes":
        return _bitsandbytes_problem(module)
    return None


def _bitsandbytes_problem(bnb) -> str | None:
    # 8-bit state is used only for tensors of at least 4096 elements: probe with one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        weight = torch.nn.Parameter(torch.ones(4096, device=device))
        optimizer = bnb.optim.AdamW8bit([weight], lr=1e-3)
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        if not torch.isfinite(weight).all():
            return "bitsandbytes' 8-bit AdamW gives non-finite values on this machine"
    except Exception as error:
        return (f"bitsandbytes is installed but its 8-bit AdamW does not run on this machine "
                f"({device}: {type(error).__name__}: {str(error)[:200]})")
    return None


def _require(name: str):
    spec = OPTIMIZERS[name]
    problem = _problem(spec.package)
    if problem:
        raise OptimizerError(f"optimizer_type: {name} needs the {spec.pip_name} package: "
                             f"{problem} (pip install {spec.pip_name}); or choose AdamW")
    return importlib.import_module(spec.package)


def available_optimizers() -> dict[str, str | None]:
    """{name: None if usable here, else the reason it is not}."""
    return {name: (_problem(spec.package) if spec.package else None)
            for name, spec in OPTIMIZERS.items()}


def parse_optimizer_args(items: Iterable[str] | str | None) -> dict[str, Any]:
    """kohya's `--optimizer_args`: `key=value` items, values read as Python literals
    (`weight_decay=0.1 betas=(0.9,0.99) relative_step=False`)."""
    if not items:
        return {}
    if isinstance(items, str):
        items = items.split()
    args = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise OptimizerError(f"optimizer_args: {item!r} is not key=value")
        try:
            args[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise OptimizerError(f"optimizer_args: the value of {key!r} ({value!r}) is not a "
                                 "number, string, boolean, tuple or list") from None
    return args


def create_optimizer(name: str, params, lr: float, **args) -> torch.optim.Optimizer:
    """Build optimizer `name` for `params` (tensors or param-group dicts, each may carry its own
    'lr') with base learning rate `lr` and extra keyword `args`."""
    spec = _lookup(name)
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise OptimizerError(f"learning_rate: must be a non-negative number, got {lr!r}")
    params = _groups(params)
    try:
        return spec.build(params, lr, **dict(args))
    except OptimizerError:
        raise
    except TypeError as error:
        raise OptimizerError(f"optimizer_args: {spec.name} does not accept these arguments "
                             f"({error})") from None
    except ValueError as error:
        raise OptimizerError(f"optimizer_args: {spec.name} rejected its arguments ({error})") from None


def canonical_name(name: str) -> str:
    return _lookup(name).name


def advice(name: str, lr: float, group_lrs: Iterable[float] = ()) -> list[str]:
    """kohya's warnings for a choice of optimizer and learning rate."""
    spec = _lookup(name)
    notes = []
    if spec.name == "Prodigy":
        if lr <= 0.1:
            notes.append(f"Prodigy adapts its own step size: a learning rate around 1.0 is "
                         f"recommended (got {lr})")
        if len(set(group_lrs) | {lr}) > 1:
            notes.append("Prodigy: with several learning rates only the first group's is used "
                         "for its step-size estimate")
    return notes
