"""Model families: one adapter module per family (`sd1.py`, `sd2.py`, `sdxl.py`) registered
here, each saying how it is told apart from a diffusers folder or a single checkpoint file, which
pipeline class loads it and what it is trained to predict (its objective). The functions below
detect a family by asking the registered adapters, so a new family is one new module. Torch-free.
"""
from __future__ import annotations

import importlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from core.registry import Registry


class FamilyError(ValueError):
    pass


@dataclass(frozen=True)
class Memory:
    """What a LoRA step costs on a model, measured with `python3 -m trainers lora --config
    run.toml --memory-report` (trainers/memory_report.py) and used by the estimate."""
    lora_per_rank: tuple[float, float]  # trained parameters per rank: denoiser, text encoder(s)
    activations_256: tuple[float, float]  # bytes kept for backward, fp32, one 256 px image:
    # the denoiser's (grows with pixels), the text encoder's when it trains
    # the denoiser's with gradient checkpointing, its one recomputed block included, when
    # measured (bench/flow_memory.py); None: a share of activations_256
    checkpointed_256: float | None = None
    # text tokens in the denoiser's sequence beside a 256 px image's 256 (Flux's 512 T5 tokens):
    # they do not grow with the image; 0: everything grows with the pixels (U-Nets, and the
    # families that drop a caption's padding)
    context_tokens: int = 0


@dataclass(frozen=True)
class Demo:
    """A family's built-in demo model: tiny random weights in the family's real folder layout
    (trainers/tiny_model.py builds it), so every tab works on a CPU with no download."""
    name: str  # what the model dropdown lists, "tiny-demo-sdxl"
    label: str  # what the dropdown says about it
    builder: str  # "module:function" -> its modules, in the order of `parts`
    scheduler: dict  # its scheduler_config.json
    index: dict  # its model_index.json entries after the ones every SD-shaped demo has
    params: tuple[float, float, float]  # U-Net, text encoder(s), VAE parameters
    hypernetwork_sizes: tuple[int, ...]  # context width, then self-attention widths
    parts: tuple[str, ...] = ("unet", "vae", "text_encoder", "text_encoder_2")  # folder names
    memory: Memory | None = None  # measured; None: scaled from SD 1.x's by size


@dataclass(frozen=True)
class Family:
    name: str  # "sd1"
    label: str  # what the page calls it, "SD 1.x"
    context_width: int  # the U-Net's cross-attention width (a U-Net-only file is told by it)
    pipeline: str  # the diffusers pipeline class that loads and renders it
    text_activation: str | None = None  # its CLIP text encoder's hidden_act, when it tells
    text_key_prefix: str = ""  # original-layout keys of its text encoder(s)
    unet_key_markers: tuple[str, ...] = ()  # original-layout U-Net keys only it has
    folder_marker: Callable[[dict, dict], bool] | None = None  # (model_index, unet config)
    prediction: str = "noise"  # noise (epsilon / v, by the scheduler config) | flow
    # per tokenizer folder (tokenizer, tokenizer_2): its pad token; None pads with the end token
    tokenizer_pads: tuple[str | None, ...] = (None,)
    # per tokenizer folder: "clip" (the default), "t5", "qwen", or the "module:function" that
    # writes the demo's
    tokenizer_kinds: tuple[str, ...] = ()
    # original-layout key of each text encoder's token-embedding table
    token_embedding_keys: tuple[str, ...] = ()
    # an embedding's vectors, one set per text encoder under these names; () is one tensor
    embedding_halves: tuple[str, ...] = ()
    safety_checker: bool = True  # its pipeline takes a safety_checker argument (Danlu passes None)
    shipped_sampler: str = "PNDM"  # the scheduler its saved diffusers folders get
    checkpoint_layout: str = ""  # the single-file layout it is written in (formats/sd_checkpoint)
    kohya_flags: Mapping[str, bool] = field(default_factory=dict)  # kohya's v2 / sdxl metadata
    resolution: int = 512  # its native training size (kohya's modelspec.resolution)
    v_resolution: int | None = None  # the same for its v-prediction models, when it differs
    params: tuple[float, float, float] = (0.0, 0.0, 0.0)  # U-Net, text, VAE parameter counts
    hypernetwork_sizes: tuple[int, ...] = ()  # context width, then self-attention widths
    prompt_encoder: str = "trainers.conditioning:clip_prompt_encoder"  # "module:function"
    preview_pipeline: str = "trainers.sampling:sd_pipeline"  # "module:function"
    # (denoiser, noisy latents, model timesteps, context, extra conditioning, dtype) -> the
    # prediction, shaped like the latents
    predict: str = "trainers.step:unet_prediction"
    denoiser: str = "unet"  # the pipeline component that denoises: "unet" | "transformer"
    lora_layout: str = "trainers.lora_network:UNET_LAYOUT"  # its LoRA targets and file names
    # "module:function" (vae) -> the VAE as training sees its latents, when the denoiser's
    # latent space is not the VAE's own (Flux.2: patched 2x2 and batch-normalised)
    training_vae: str | None = None
    # "module:function" (model) -> LoRA metadata keys set (or, None, dropped) over the SD ones
    lora_metadata: str | None = None
    single_file: bool = True  # Danlu loads its original-layout single files (a config skeleton)
    # "module:NAME" of the original layout of its transformer-only single files (to_diffusers /
    # to_original; trainers/formats/transformer_layouts.py), loaded by trainers/transformer_file.py
    transformer_file: str | None = None
    memory: Memory | None = None  # measured step costs; None: scaled from SD 1.x's by size
    demo: Demo | None = None

    def objective(self, scheduler_config: dict, flow=None, noise=None):
        """What its network is trained to predict, and how latents are noised; `flow` is the
        run's FlowMatchingOptions (how sigmas are drawn) for a flow-matching family, `noise`
        its NoiseWeighting (extra loss weights) for a noise-prediction one."""
        from trainers import objectives
        if self.prediction == "flow":
            return objectives.FlowMatching(
                flow or objectives.FlowMatchingOptions(),
                num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000))
        return objectives.NoisePrediction(scheduler_config, noise or objectives.NoiseWeighting())

    def pipeline_class(self):
        import diffusers
        return getattr(diffusers, self.pipeline)

    def pipeline_kwargs(self) -> dict:
        """What its pipeline class is given besides the weights when Danlu loads it."""
        return {"safety_checker": None} if self.safety_checker else {}

    def native_resolution(self, prediction_type: str | None) -> int:
        if prediction_type == "v_prediction" and self.v_resolution:
            return self.v_resolution
        return self.resolution

    def hook(self, name: str) -> Callable:
        """The function its "module:function" field `name` names (imported when asked for)."""
        return resolve(getattr(self, name))


def resolve(target: str) -> Callable:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


_REGISTRY: Registry[Family] = Registry("model family", FamilyError)


def register(family: Family) -> Family:
    return _REGISTRY.add(family.name, family)


unregister = _REGISTRY.remove
get = _REGISTRY.get  # FamilyError naming the known families
all_families = _REGISTRY.records
names = _REGISTRY.names


def pipeline_class(family: str):
    return get(family).pipeline_class()


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _known() -> str:
    labels = [f.label for f in all_families()]
    return " or ".join([", ".join(labels[:-1]), labels[-1]] if len(labels) > 1 else labels)


def folder_family(folder: str | Path) -> str:
    """The family of a diffusers folder, from its configs (no weights are read)."""
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    if not index:
        raise FamilyError(f"model: {folder} has no readable model_index.json")
    return configs_family(index, _json(folder / "unet" / "config.json"),
                          _json(folder / "text_encoder" / "config.json"), folder.name)


def pipeline_family(pipe) -> str:
    """The family of a loaded diffusers pipeline, from its components' configs."""
    index = {"_class_name": type(pipe).__name__,
             **{name: [None, type(part).__name__] for name, part in pipe.components.items()
                if part is not None}}
    text = getattr(getattr(pipe, "text_encoder", None), "config", None)
    denoiser = getattr(pipe, "unet", None)
    return configs_family(index, dict(denoiser.config) if denoiser is not None else {},
                          text.to_dict() if text is not None else {}, type(pipe).__name__)


def configs_family(index: dict, unet: dict, text: dict, name: str) -> str:
    """A family's own marker decides first (SDXL: a second text encoder or the U-Net's
    `text_time` embedding); then the text encoder's activation (SD1's OpenAI CLIP uses
    quick_gelu, SD2's OpenCLIP gelu); the context width settles what the activation cannot."""
    for family in all_families():
        if family.folder_marker is not None and family.folder_marker(index, unet):
            return family.name
    activation = text.get("hidden_act")
    for family in all_families():
        if activation is not None and family.text_activation == activation:
            return family.name
    width = unet.get("cross_attention_dim")
    for family in all_families():
        if family.context_width == width:
            return family.name
    raise FamilyError(f"model: cannot tell whether {name} is {_known()} "
                      f"(text encoder activation {activation!r}, context width {width!r})")


def detect_family(keys: Iterable[str] | Mapping[str, Any]) -> str | None:
    """The family from original-layout key names (and shapes, when given a mapping of
    key -> tensor or shape); None when nothing says. Torch-free.

    The text encoder decides (`cond_stage_model.transformer.*` is SD1's CLIP,
    `cond_stage_model.model.*` SD2's OpenCLIP, `conditioner.embedders.*` SDXL); a U-Net-only
    file by a key only one family has (SDXL's `label_emb`) or its cross-attention width; a flow
    family's transformer file by a key only its transformer has (Flux.1's `vector_in`, Chroma's
    `distilled_guidance_layer`), with or without ComfyUI's `model.diffusion_model.`."""
    names = list(keys)
    for family in all_families():
        if family.text_key_prefix and any(k.startswith(family.text_key_prefix) for k in names):
            return family.name
    bare = [k.removeprefix("model.diffusion_model.") for k in names]  # ComfyUI's prefix
    for family in all_families():
        if any(k.startswith(m) for m in family.unet_key_markers for k in (*names, *bare)):
            return family.name
    if isinstance(keys, Mapping):
        for key in names:
            if key.startswith("model.diffusion_model.") and key.endswith(".attn2.to_k.weight"):
                shape = getattr(keys[key], "shape", keys[key])
                width = int(shape[-1])
                return next((f.name for f in all_families() if f.context_width == width), None)
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
    name = (name or "").strip()
    if name in demo_families():
        return demo_families()[name]
    candidate = Path(paths.stable_diffusion) / name
    try:
        if getattr(paths, "confine", False):  # a shared app reads nothing outside its folder
            candidate = paths.resolve(candidate, "model")
        if candidate.is_dir():
            return folder_family(candidate)
        if candidate.is_file() and candidate.suffix.lower() == ".safetensors":
            return detect_family(safetensors_shapes(candidate))
    except (OSError, ValueError):
        return None
    return None


def prediction_type_beside(path: str | Path) -> str | None:
    """What a single file predicts, from the `<name>.yaml` beside it as A1111 reads it:
    `parameterization: "v"` means v, any other yaml epsilon; None without a yaml (the family's
    config then says: the shipped SD2 skeleton says v, as SD 2.0/2.1-768 and diffusers assume).
    SD 2.x 768-v and 512 base files have the same keys, so only this tells them apart."""
    yaml = Path(path).with_suffix(".yaml")
    if not yaml.is_file():
        return None
    text = yaml.read_text(errors="replace")
    compact = text.replace(" ", "").replace("'", '"')
    return "v_prediction" if 'parameterization:"v"' in compact else "epsilon"


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
    """The family of an original-layout single file, by its keys and shapes."""
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
        raise FamilyError(f"model: {path.name} is not a checkpoint of {_known()} in the "
                          f"original layout (keys such as {sample})")
    return family


def demo_families() -> dict[str, str]:
    """demo model name -> family, in registration order (the first is the app's default)."""
    return {f.demo.name: f.name for f in all_families() if f.demo is not None}


def demo_of(name: str) -> Demo | None:
    family = demo_families().get((name or "").strip())
    return get(family).demo if family else None


# The families, one module each (registered on import, in this order).
from trainers.families import sd1 as _sd1, sd2 as _sd2, sdxl as _sdxl, flux as _flux, zimage as _zimage, chroma as _chroma, flux2 as _flux2, qwenimage as _qwenimage  # noqa: E402,F401,E501
