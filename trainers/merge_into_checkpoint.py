"""Merge LoRA / LoCon / LyCORIS files into a base model and save one original-layout checkpoint.

Each file's change, weight * its delta (kohya LoRA: alpha / rank * up @ down; LoHa / LoKr: the
formulas in trainers/formats/lycoris.py), is added to the fp32 weight of the module it names;
the files are added in the order given. A DoRA module (`dora_scale`) changes the weight W it
meets to W + weight * (W' - W), W' = dora_scale * (W + delta) / ||W + delta|| on the axis
its dora_scale's shape names (trainers/formats/dora.py), as A1111 and ComfyUI apply it.
The result is written as the single `.safetensors` A1111, ComfyUI and Forge load from
models/Stable-diffusion (trainers/formats/sd_checkpoint.py), so only the families Danlu writes
in that layout (SD 1.x, SD 2.x, SDXL) are accepted."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from core import events as ev
from trainers import families
from trainers.formats.dora import dora_delta
from trainers.formats.lora import PRECISIONS, read_lora_metadata
from trainers.formats.lycoris import algo_of, load_adapter, lycoris_delta
from trainers.formats.sd_checkpoint import save_single_file
from trainers.lora_network import kohya_module_map, lora_delta, lora_names
from trainers.models import give_back, load_model, resolve_model


def output_target(paths, output_name: str, overwrite: bool) -> Path:
    """models/Stable-diffusion/<output_name>.safetensors; an existing file only with overwrite."""
    target = paths.stable_diffusion / f"{output_name.strip()}.safetensors"
    if target.exists() and not overwrite:
        raise FileExistsError(f"output_name: {target.name} exists in {paths.stable_diffusion}; "
                              "tick 'Overwrite' to replace it")
    return target


def model_family(paths, name: str) -> str | None:
    """The base model's family, read without loading it (None for a hub id or a .ckpt, which
    is read whole: checked once loaded)."""
    kind, location = resolve_model(paths, name)
    if kind == "demo":
        return families.demo_families()[name.strip()]
    if kind == "folder":
        return families.folder_family(location)
    if kind == "file" and Path(location).suffix.lower() == ".safetensors":
        return families.file_family(location)
    return None


def refuse_family(family: str | None, name: str) -> None:
    if family is not None and not families.get(family).checkpoint_layout:
        writable = ", ".join(f.label for f in families.all_families() if f.checkpoint_layout)
        raise ValueError(f"model: {name} is a {families.get(family).label} model; Danlu writes "
                         f"merged checkpoints of {writable} models only (the single-file layout "
                         f"of {families.get(family).label} is not written here)")


def module_delta(state: dict, name: str, weight: torch.Tensor, multiplier: float,
                 lycoris: bool) -> torch.Tensor:
    """The change file `state` makes to the module `name` whose weight is `weight` (float32)."""
    shape = tuple(weight.shape)
    scale = state.get(f"{name}.dora_scale")
    at = multiplier if scale is None else 1.0  # DoRA: the strength applies after decomposing
    if lycoris:
        delta = lycoris_delta(state, name, multiplier=at)
    else:
        alpha = state.get(f"{name}.alpha")
        delta = lora_delta(state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"],
                           None if alpha is None else float(alpha.float().reshape(())), at)
    # a Linear's change fits a 1x1 conv of the same size and back (SD1's proj_in / proj_out);
    # LyCORIS keeps a conv's change flattened to [out, in * kh * kw]
    if tuple(delta.shape) != shape and delta.numel() == weight.numel() \
            and delta.shape[0] == shape[0]:
        delta = delta.reshape(shape)
    if tuple(delta.shape) != shape:
        raise ValueError(f"{name}: its change is {list(delta.shape)} but the model's weight is "
                         f"{list(shape)}")
    if scale is not None:
        delta = dora_delta(weight, delta, scale, multiplier)
    return delta


def merge_file(modules: dict, state: dict, multiplier: float, label: str) -> int:
    """Add one file's change into `modules` (kohya name -> Linear / Conv2d); returns the number
    of modules changed. Every key is checked against the model before any weight changes."""
    lycoris = algo_of(state) is not None
    names = lora_names(state)
    unknown = [n for n in names if n not in modules]
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise ValueError(f"loras: {label} does not fit this model: {len(unknown)} of its "
                         f"{len(names)} layers name no module of it ({shown}); was it trained "
                         "for another model family?")
    for name in names:  # checked first, one layer at a time (all of them would not fit)
        try:
            module_delta(state, name, modules[name].weight, multiplier, lycoris)
        except (ValueError, RuntimeError, KeyError) as error:
            raise ValueError(f"loras: {label} does not fit this model: {error}") from None
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            delta = module_delta(state, name, weight, multiplier, lycoris)
            weight.add_(delta.to(weight.device, weight.dtype))
    return len(names)


def base_config(model) -> str | None:
    """The demo whose configs a Danlu-made single file loads with (`danlu.base_config`)."""
    if model.is_demo:
        return model.name
    source = Path(model.source)
    if source.is_file() and source.suffix.lower() == ".safetensors":
        return read_lora_metadata(source).get("danlu.base_config")
    return None


def run(cfg, ctx) -> Path:
    cfg.validate()
    paths = ctx.paths
    target = output_target(paths, cfg.output_name, cfg.overwrite)
    refuse_family(model_family(paths, cfg.model), cfg.model)
    loaded = []
    for name, weight in cfg.weighted():
        ctx.emit(ev.Status(f"Reading {name}"))
        state, metadata = load_adapter(paths.resolve(paths.lora / name, "loras"))
        loaded.append((name, weight, state, metadata))
    ctx.emit(ev.Status(f"Loading {cfg.model}"))
    model = load_model(paths, cfg.model, exclusive=True)  # its weights change below
    try:
        refuse_family(model.family, cfg.model)
        modules = kohya_module_map(model.unet, model.text_encoder, model.text_encoder_2)
        counts = []
        for name, weight, state, _ in loaded:
            ctx.emit(ev.Status(f"Merging {name} x {weight:g}"))
            counts.append(merge_file(modules, state, weight, name))
        listed = ", ".join(f"{name} x {weight:g}" for name, weight, _, _ in loaded)
        metadata = {
            "danlu.method": "merge_into_checkpoint", "danlu.base_model": model.name,
            "danlu.merged_loras": json.dumps([
                {"file": name, "weight": weight, "hash": meta.get("sshs_model_hash", "")}
                for name, weight, _, meta in loaded]),
            "modelspec.title": target.stem,
            "ss_training_comment": f"{model.name} with {listed} merged in"}
        if base_config(model):
            metadata["danlu.base_config"] = base_config(model)
        from trainers.methods.dreambooth import schedule_markers
        ctx.emit(ev.Status(f"Saving {target.name}"))
        save_single_file(target, model.unet, model.vae, model.text_encoder,
                         dtype=PRECISIONS[cfg.save_precision], metadata=metadata,
                         family=model.spec.checkpoint_layout,
                         text_encoder_2=model.text_encoder_2, markers=schedule_markers(model))
        yaml = Path(model.source).with_suffix(".yaml")
        if Path(model.source).is_file() and yaml.is_file():  # SD 2.x: what it predicts
            shutil.copyfile(yaml, target.with_suffix(".yaml"))
    finally:
        give_back(model, {"unet", "text_encoder", "text_encoder_2"})  # changed: not reused
    ctx.emit(ev.Saved(step=0, path=str(target), kind="final"))
    ctx.emit(ev.Finished(step=0, path=str(target), message=(
        f"Merged {listed} into {cfg.model} ({sum(counts)} layer changes), saved as {target}")))
    return target
