"""Model families (SD 1.x, SD 2.x, SDXL): tell them apart from a diffusers folder or a single
checkpoint file by keys and shapes, and name the pipeline class each one loads with."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

FAMILIES = ("sd1", "sd2", "sdxl")
LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# SDXL's context is 2048 wide (768 + 1280), SD2's 1024, SD1's 768
CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


class FamilyError(ValueError):
    pass


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def folder_family(folder: str | Path) -> str:
    """'sd1' / 'sd2' / 'sdxl' for a diffusers folder, from its configs (no weights are read).

    A second text encoder or the U-Net's `text_time` embedding says SDXL; otherwise the text
    encoder's activation says which CLIP it is (SD1's OpenAI CLIP uses quick_gelu, SD2's OpenCLIP
    gelu), and the context width settles what the activation cannot."""
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    unet = _json(folder / "unet" / "config.json")
    if not index:
        raise FamilyError(f"model: {folder} has no readable model_index.json")
    if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index \
            or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    text = _json(folder / "text_encoder" / "config.json")
    activation = text.get("hidden_act")
    if activation == "gelu":
        return "sd2"
    if activation == "quick_gelu":
        return "sd1"
    width = unet.get("cross_attention_dim")
    if width in CONTEXT_WIDTHS:
        return CONTEXT_WIDTHS[width]
    raise FamilyError(f"model: cannot tell whether {folder.name} is SD1, SD2 or SDXL "
                      f"(text encoder activation {activation!r}, context width {width!r})")


def detect_family(keys: Iterable[str] | Mapping[str, Any]) -> str | None:
    """'sd1', 'sd2' or 'sdxl' from original-layout key names (and shapes, when given a mapping
    of key -> tensor or shape); None when nothing says. Torch-free.

    The text encoder decides: `cond_stage_model.transformer.*` is SD1's CLIP,
    `cond_stage_model.model.*` SD2's OpenCLIP, `conditioner.embedders.*` SDXL (base or refiner).
    A UNet-only file is judged by its cross-attention width (768 / 1024 / 2048) or `label_emb`.
    """
    names = list(keys)
    if any(k.startswith("conditioner.embedders.") for k in names):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in names):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in names):
        return "sd1"
    if any(k.startswith("model.diffusion_model.label_emb.") for k in names):
        return "sdxl"
    if isinstance(keys, Mapping):
        for key in names:
            if key.startswith("model.diffusion_model.") and key.endswith(".attn2.to_k.weight"):
                shape = getattr(keys[key], "shape", keys[key])
                return CONTEXT_WIDTHS.get(int(shape[-1]))
    return None


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """key -> shape from a .safetensors header, read as JSON (no torch, no tensor data)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * 2**20:
            raise FamilyError(f"model: {Path(path).name} has an implausible header")
        header = json.loads(handle.read(length))
    return {k: tuple(v.get("shape", ())) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)}


def guess_family(paths, name: str) -> str | None:
    """The family of a model-dropdown name without loading anything (for estimates); None
    when it cannot be told cheaply (a .ckpt, a hub id, an unreadable file)."""
    from trainers.tiny_model import DEMO_MODELS
    name = (name or "").strip()
    if name in DEMO_MODELS:
        return DEMO_MODELS[name]
    candidate = Path(paths.stable_diffusion) / name
    try:
        if candidate.is_dir():
            return folder_family(candidate)
        if candidate.is_file() and candidate.suffix.lower() == ".safetensors":
            return detect_family(safetensors_shapes(candidate))
    except (OSError, ValueError):
        return None
    return None


def file_keys(path: str | Path) -> dict:
    """key -> shape of a single-file checkpoint (the header only, for .safetensors)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return safetensors_shapes(path)
    from trainers.formats.safe_load import safe_torch_load
    data = safe_torch_load(path)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise FamilyError(f"model: {path.name} is not a checkpoint (no state dict)")
    return {k: tuple(getattr(v, "shape", ())) for k, v in data.items() if isinstance(k, str)}


def file_family(path: str | Path) -> str:
    """'sd1' / 'sd2' / 'sdxl' for an original-layout single file, by its keys and shapes."""
    path = Path(path)
    try:
        shapes = file_keys(path)
    except FamilyError:
        raise
    except Exception as error:
        raise FamilyError(f"model: could not load {path.name!r}: {type(error).__name__}: "
                          f"{error}") from error
    family = detect_family(shapes)
    if family is None:
        sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
        raise FamilyError(f"model: {path.name} is not an SD1, SD2 or SDXL checkpoint in the "
                          f"original layout (keys such as {sample})")
    return family


def sd2_prediction_type(path: str | Path) -> str | None:
    """SD 2.x 768-v files predict v, SD 2.x base (512) files noise; the keys cannot tell. A1111
    reads a `<name>.yaml` beside the file: `parameterization: "v"` means v, any other yaml
    epsilon. Without a yaml None: the config's own (the shipped SD2 skeleton says v, what SD
    2.0/2.1-768 and diffusers assume)."""
    yaml = Path(path).with_suffix(".yaml")
    if not yaml.is_file():
        return None
    text = yaml.read_text(errors="replace")
    compact = text.replace(" ", "").replace("'", '"')
    return "v_prediction" if 'parameterization:"v"' in compact else "epsilon"
