"""The diffusers part of the LoRA Check (trainers/formats/key_check.py): the family's pipeline's
own `lora_state_dict` converts the file as `load_lora_weights` would, and what comes out is
checked as the loader then uses it: every key must contain "lora" (else diffusers refuses the
file), belong to a component the pipeline loads into, and name a module of that component
(peft skips the rest). Converter errors and warnings (keys dropped or left unconverted) are
reported with the keys they name."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from trainers.formats.key_check import LoaderResult
from trainers.formats.lora_key_maps import CLIP_LEAVES, FamilyModules

PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sdxl": "StableDiffusionXLPipeline", "flux1": "FluxPipeline",
             "chroma": "ChromaPipeline", "flux2_klein": "Flux2KleinPipeline",
             "zimage": "ZImagePipeline", "qwen_image": "QwenImagePipeline"}
# what StableDiffusionXLPipeline.load_lora_weights passes to lora_state_dict (SGM -> diffusers)
SDXL_UNET_CONFIG = {"layers_per_block": 2}
ADAPTER_TAIL = re.compile(r"(\.lora_[AB](\.[\w]+)?\.weight|\.lora_magnitude_vector(\.[\w]+)?"
                          r"|\.lora\.(up|down)\.weight|_lora\.(up|down)\.weight|\.alpha)$")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _components(modules: FamilyModules) -> dict[str, set[str]]:
    out = {modules.diffusers_component: {d for d, _ in modules.denoiser}}
    for _prefix, (component, layers, _also) in modules.text.items():
        out[component] = {f"text_model.encoder.layers.{n}.{leaf}" for n in range(layers)
                          for leaf in CLIP_LEAVES}
    return out


def _peft_modules(component: str, state: dict) -> list[tuple[str, str]]:
    """[(key, module path)] as diffusers' loaders hand one component's keys to peft (its
    legacy `to_q_lora.down` names renamed first, as load_lora_into_unet / _text_encoder do)."""
    from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                 convert_unet_state_dict_to_peft)
    inner = {key[len(component) + 1:]: value for key, value in state.items()}
    try:
        if component == "unet":
            inner = convert_unet_state_dict_to_peft(inner)
        elif component.startswith("text_encoder"):
            inner = convert_state_dict_to_peft(convert_state_dict_to_diffusers(inner))
    except Exception:  # keys the legacy renaming does not know: judged as they are
        pass
    return [(f"{component}.{key}", ADAPTER_TAIL.sub("", key)) for key in inner]


def check_diffusers(path: Path, modules: FamilyModules) -> LoaderResult:
    result = LoaderResult("diffusers")
    try:
        import diffusers
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - diffusers is a dependency
        result.applies, result.note = False, f"diffusers is not installed ({error})"
        return result
    pipeline = getattr(diffusers, PIPELINES[modules.name])
    state = safetensors.torch.load_file(str(path))
    original = set(state)
    kwargs = {"unet_config": _Config(SDXL_UNET_CONFIG)} if modules.name == "sdxl" else {}
    collector = _Collect()
    logger = logging.getLogger("diffusers")
    # only here, whatever verbosity the app set (load_model silences diffusers' warnings)
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    logger.handlers, logger.propagate = [collector], False
    logger.setLevel(logging.WARNING)
    try:
        converted = pipeline.lora_state_dict(dict(state), **kwargs)
    except Exception as error:
        result.fatal = f"{pipeline.__name__}.lora_state_dict: {_first_lines(error)}"
        return result
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)
    if isinstance(converted, tuple):
        converted = converted[0]
    for message in collector.messages:
        named = [k for k in original if k in message]
        if "dora_scale" in message:
            named = [k for k in original if k.endswith(".dora_scale")]
        for key in named:
            result.not_loaded[key] = f"dropped by diffusers: {message.splitlines()[0][:160]}"
        if not named:
            result.note = (result.note + " " if result.note else "") + message.splitlines()[0][:200]
    bad = [k for k in converted if "lora" not in k]
    if bad:
        result.fatal = (f"{pipeline.__name__}.load_lora_weights refuses the file: keys without "
                        f"'lora' ({', '.join(sorted(bad)[:3])})")
        return result
    components = _components(modules)
    by_component: dict[str, dict] = {}
    for key, value in converted.items():
        component = key.split(".", 1)[0]
        if component not in components:
            result.not_loaded[key] = (f"diffusers loads only {', '.join(components)} keys "
                                      f"into a {modules.label} pipeline")
            continue
        by_component.setdefault(component, {})[key] = value
    for component, part in by_component.items():
        for key, module in _peft_modules(component, part):
            if module not in components[component]:
                result.not_loaded[key] = f"no {component} module {module!r} in {modules.label}"
    return result


class _Config(dict):
    """A config dict with attribute access, as diffusers' FrozenDict gives the U-Net's."""
    __getattr__ = dict.__getitem__


def _first_lines(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:400]}"
