"""kohya-format LoRA `.safetensors` files (what A1111, ComfyUI, Forge and diffusers load).

Tensors: `<name>.lora_down.weight` [r, in] or [r, in, kh, kw], `<name>.lora_up.weight` [out, r]
or [out, r, 1, 1], `<name>.alpha` (0-d; scale = alpha / r), names `lora_unet_*` / `lora_te_*`.
Header metadata: all strings; kohya sd-scripts' `ss_*` training keys, `modelspec.*` (the
Stability AI model spec) and the two hashes kohya precomputes for sd-webui-additional-networks:

- `sshs_model_hash`: sha256 (hex) of the safetensors data section (the bytes after the 8-byte
  header length and the JSON header). The data section does not depend on the metadata, so it
  equals the "addnet" hash A1111 computes from the saved file itself.
- `sshs_legacy_hash`: the first 8 hex of sha256 of the 64 KiB at offset 1 MiB of the file as it
  would be serialised with only the `ss_*` metadata (kohya's definition; for a file below
  1 MiB that is the sha256 of nothing, e3b0c442).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

from core.atomic import atomic_write
from trainers.formats.bundled_embeddings import PREFIX as BUNDLE_PREFIX, split_bundle
from trainers.formats.save_check import check_savable

SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".ckpt", ".bin")
NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.0"
IMPLEMENTATION = "diffusers"  # kohya's modelspec.implementation for SD1/SD2 LoRA
IMPLEMENTATION_SDXL = "https://github.com/Stability-AI/generative-models"  # kohya's, for SDXL
SDXL_BASE_VERSION = "sdxl_base_v1-0"
PRECISIONS = {"fp32": torch.float32, "float": torch.float32, "float32": torch.float32,
              "fp16": torch.float16, "float16": torch.float16,
              "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000


class LoraFormatError(ValueError):
    """A file that is not a readable kohya LoRA; the message names the file."""


# ---- precision ----------------------------------------------------------------------------
def precision_dtype(precision: str | torch.dtype) -> torch.dtype:
    """"fp32" / "fp16" / "bf16" (kohya's save_precision words) -> torch dtype."""
    if isinstance(precision, torch.dtype):
        if precision not in PRECISIONS.values():
            raise ValueError(f"unsupported save precision {precision}; use fp32, fp16 or bf16")
        return precision
    try:
        return PRECISIONS[str(precision).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown save precision {precision!r}; use fp32, fp16 or bf16") from None


def to_precision(state: Mapping[str, torch.Tensor], precision: str | torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor (alphas too, as kohya does) cast to the save precision, on the CPU."""
    dtype = precision_dtype(precision)
    return {key: value.detach().to("cpu", dtype).contiguous() for key, value in state.items()}


# ---- hashes -------------------------------------------------------------------------------
def addnet_hash(data: bytes) -> str:
    """sha256 of a serialised safetensors file's data section (after header length + header)."""
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_length:]).hexdigest()


def addnet_legacy_hash(data: bytes) -> str:
    """First 8 hex of sha256 of the 64 KiB at offset 1 MiB."""
    return hashlib.sha256(data[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]


def lora_hashes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya precomputes them: from the serialisation
    with only the `ss_*` metadata, so user-edited metadata does not change them."""
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(state), metadata=training or None)
    return addnet_hash(data), addnet_legacy_hash(data)


def file_legacy_hash(path: str | Path) -> str:
    """A1111's old model hash (kohya `model_hash`): 8 hex of sha256 of 64 KiB at 1 MiB."""
    with open(path, "rb") as handle:
        handle.seek(LEGACY_OFFSET)
        return hashlib.sha256(handle.read(LEGACY_LENGTH)).hexdigest()[:8]


def file_sha256(path: str | Path) -> str:
    """sha256 of the whole file (kohya `calculate_sha256`, A1111's new model hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- save / load --------------------------------------------------------------------------
def _check_state(state: Mapping[str, torch.Tensor], where: str) -> None:
    if not state:
        raise ValueError(f"{where}: no LoRA tensors to save")
    names = {key.split(".", 1)[0] for key in state}
    for name in sorted(names):
        for part in ("lora_down.weight", "lora_up.weight"):
            if f"{name}.{part}" not in state:
                raise ValueError(f"{where}: {name} has no {part}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: {key} is a {type(value).__name__}, not a tensor")


def save_lora(path: str | Path, state: Mapping[str, torch.Tensor],
              metadata: Mapping[str, str] | None = None,
              precision: str | torch.dtype | None = None) -> dict[str, str]:
    """Write a kohya LoRA file atomically; returns the metadata written (with sshs_* hashes).

    `precision` ("fp32"/"fp16"/"bf16") casts every tensor first; None keeps their dtypes.
    Bundled embeddings (`bundle_emb.*`, trainers/formats/bundled_embeddings.py) may ride along.
    """
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise ValueError(f"{path.name}: LoRA files are written as {SUFFIX}")
    _check_state(split_bundle(state)[0], path.name)
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{path.name}: metadata {key!r} must be a string, "
                            f"not {type(value).__name__}")
    check_savable(path.name, state, precision_dtype(precision) if precision is not None else None)
    tensors = to_precision(state, precision) if precision is not None else \
        {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = lora_hashes(tensors, meta)
    atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, str(temp), metadata=meta))
    return meta


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise LoraFormatError(f"{path}: not a readable safetensors file "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    return state, metadata


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from trainers.formats.safe_load import NotATorchFileError, safe_torch_load
    try:
        data = safe_torch_load(path)
    except NotATorchFileError as error:
        raise LoraFormatError(f"{path}: not a readable LoRA file ({error})") from error
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraFormatError(f"{path}: not a LoRA file (expected a dict of tensors)")
    return dict(data), {}


def load_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a kohya LoRA (.safetensors; also kohya's .pt) -> (state dict, metadata). The
    state holds the adapter's tensors only: bundled embeddings are read by
    trainers.formats.bundled_embeddings.read_bundled.

    Raises LoraFormatError naming the file for a missing, corrupt or non-LoRA file.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file")
    if path.suffix.lower() in TORCH_SUFFIXES:
        state, metadata = _read_torch(path)
    else:
        state, metadata = _read_safetensors(path)
    state = {key: value for key, value in state.items() if not key.startswith(BUNDLE_PREFIX)}
    downs = [k for k in state if k.endswith(".lora_down.weight")]
    if not downs:
        sample = ", ".join(sorted(state)[:3]) or "no tensors"
        hint = " (a diffusers/peft LoRA, not kohya's format)" if any(
            "lora_A" in k or ".lora.down" in k for k in state) else ""
        raise LoraFormatError(f"{path}: not a kohya LoRA file{hint}: no '*.lora_down.weight' "
                              f"keys (found {sample})")
    unpaired = [k for k in downs if k.replace(".lora_down.", ".lora_up.") not in state]
    if unpaired:
        raise LoraFormatError(f"{path}: LoRA file is incomplete: {unpaired[0]} has no lora_up")
    return state, metadata


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    """Only the header metadata (no tensors are read)."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({error})") from error


# ---- metadata -----------------------------------------------------------------------------
def _arg(value: float | int) -> str:
    """A network arg as a user types it on kohya's command line ("4", "0.5")."""
    value = float(value)
    return str(int(value)) if value.is_integer() else str(value)


def _opt(value: Any) -> str:
    return "None" if value is None else str(value)


def base_model_version(v2: bool = False, v_parameterization: bool = False,
                       sdxl: bool = False) -> str:
    """kohya's ss_base_model_version: sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0."""
    if sdxl:
        return SDXL_BASE_VERSION
    return "sd" + ("_v2" if v2 else "_v1") + ("_v" if v_parameterization else "")


def modelspec_architecture(v2: bool = False, v_parameterization: bool = False,
                           sdxl: bool = False) -> str:
    if sdxl:
        return "stable-diffusion-xl-v1-base/lora"
    if v2:
        return ("stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512") + "/lora"
    return "stable-diffusion-v1/lora"


@dataclass(frozen=True)
class LoraTrainingInfo:
    """What a LoRA file's `ss_*` / `modelspec.*` metadata records about its training."""
    network_dim: int
    network_alpha: float
    output_name: str
    steps: int
    epoch: int
    conv_dim: int = 0
    conv_alpha: float | None = None
    network_dropout: float | None = None
    resolution: tuple[int, int] | int = (512, 512)
    learning_rate: float | None = None
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    optimizer: str = "AdamW"
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    seed: int | None = None
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None
    dataset_dirs: Mapping[str, Mapping[str, int]] | None = None
    reg_dataset_dirs: Mapping[str, Mapping[str, int]] | None = None
    training_started_at: float | None = None
    training_finished_at: float | None = None
    num_train_images: int = 0
    num_reg_images: int = 0
    batch_size: int = 1
    max_train_steps: int | None = None
    num_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    clip_skip: int | None = None
    min_snr_gamma: float | None = None
    noise_offset: float | None = None
    max_grad_norm: float | None = None
    sd_model_name: str | None = None
    sd_model_path: str | Path | None = None
    v2: bool = False
    v_parameterization: bool = False
    sdxl: bool = False
    session_id: int | None = None
    title: str | None = None
    extra: Mapping[str, Any] | None = None


def lora_metadata(info: LoraTrainingInfo) -> dict[str, str]:
    """kohya `ss_*` training metadata plus `modelspec.*`, every value a string.

    `tag_frequency` is {dataset dir name: {tag: count}}; `dataset_dirs` is {dir name:
    {"n_repeats": r, "img_count": n}}. `sd_model_path`, when it is a file, is hashed like kohya
    (ss_sd_model_hash = old A1111 hash, ss_new_sd_model_hash = sha256). `extra` adds or
    overrides keys (values passed through str()).
    """
    now = time.time()
    started = now if info.training_started_at is None else float(info.training_started_at)
    finished = now if info.training_finished_at is None else float(info.training_finished_at)
    resolution = info.resolution
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    resolution = (int(resolution[0]), int(resolution[1]))
    network_args: dict[str, str] = {}
    if info.conv_dim:
        network_args["conv_dim"] = str(int(info.conv_dim))
        network_args["conv_alpha"] = _arg(1.0 if info.conv_alpha is None else info.conv_alpha)
    meta: dict[str, str] = {
        "ss_session_id": str(random.randint(0, 2**32) if info.session_id is None
                             else int(info.session_id)),
        "ss_training_started_at": str(started),
        "ss_output_name": str(info.output_name),
        "ss_learning_rate": _opt(info.learning_rate),
        "ss_text_encoder_lr": _opt(info.text_encoder_lr),
        "ss_unet_lr": _opt(info.unet_lr),
        "ss_num_train_images": str(int(info.num_train_images)),
        "ss_num_reg_images": str(int(info.num_reg_images)),
        "ss_num_epochs": _opt(info.num_epochs),
        "ss_gradient_accumulation_steps": str(int(info.gradient_accumulation_steps)),
        "ss_max_train_steps": _opt(info.max_train_steps),
        "ss_lr_warmup_steps": str(int(info.lr_warmup_steps)),
        "ss_lr_scheduler": str(info.lr_scheduler),
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(int(info.network_dim)),
        "ss_network_alpha": str(float(info.network_alpha)),  # kohya parses it as a float
        "ss_network_dropout": _opt(info.network_dropout),
        "ss_mixed_precision": str(info.mixed_precision),
        "ss_v2": str(bool(info.v2)),
        "ss_base_model_version": base_model_version(info.v2, info.v_parameterization, info.sdxl),
        "ss_clip_skip": _opt(info.clip_skip),
        "ss_seed": _opt(info.seed),
        "ss_noise_offset": _opt(info.noise_offset),
        "ss_optimizer": str(info.optimizer),
        "ss_max_grad_norm": _opt(info.max_grad_norm),
        "ss_min_snr_gamma": _opt(info.min_snr_gamma),
        "ss_batch_size_per_device": str(int(info.batch_size)),
        "ss_total_batch_size": str(int(info.batch_size) * int(info.gradient_accumulation_steps)),
        "ss_resolution": str(resolution),
        "ss_dataset_dirs": json.dumps(_plain(info.dataset_dirs or {})),
        "ss_reg_dataset_dirs": json.dumps(_plain(info.reg_dataset_dirs or {})),
        "ss_tag_frequency": json.dumps(_plain(info.tag_frequency or {})),
        "ss_training_finished_at": str(finished),
        "ss_steps": str(int(info.steps)),
        "ss_epoch": str(int(info.epoch)),
    }
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args)
    if info.sd_model_path is not None:
        model_path = Path(info.sd_model_path)
        if model_path.is_file():
            meta["ss_sd_model_hash"] = file_legacy_hash(model_path)
            meta["ss_new_sd_model_hash"] = file_sha256(model_path)
        meta["ss_sd_model_name"] = info.sd_model_name or model_path.name
    elif info.sd_model_name is not None:
        meta["ss_sd_model_name"] = str(info.sd_model_name)
    meta.update(modelspec_metadata(title=info.title or info.output_name, resolution=resolution,
                                   timestamp=finished, v2=info.v2,
                                   v_parameterization=info.v_parameterization,
                                   clip_skip=info.clip_skip, sdxl=info.sdxl))
    for key, value in (info.extra or {}).items():
        meta[str(key)] = value if isinstance(value, str) else (
            json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    return meta


def modelspec_metadata(*, title: str, resolution: tuple[int, int], timestamp: float | None = None,
                       v2: bool = False, v_parameterization: bool = False,
                       clip_skip: int | None = None, sdxl: bool = False) -> dict[str, str]:
    """The `modelspec.*` keys kohya writes for an SD1/SD2/SDXL LoRA."""
    stamp = int(time.time() if timestamp is None else timestamp)
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(v2, v_parameterization, sdxl),
        "modelspec.implementation": IMPLEMENTATION_SDXL if sdxl else IMPLEMENTATION,
        "modelspec.title": str(title),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(stamp).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    return meta


def _plain(value: Any) -> Any:
    """Mappings to dicts with str keys, for json.dumps."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def update_progress(metadata: Mapping[str, str], *, steps: int, epoch: int,
                    finished_at: float | None = None) -> dict[str, str]:
    """A copy with ss_steps / ss_epoch / ss_training_finished_at set for a new save."""
    meta = dict(metadata)
    meta["ss_steps"] = str(int(steps))
    meta["ss_epoch"] = str(int(epoch))
    meta["ss_training_finished_at"] = str(time.time() if finished_at is None else float(finished_at))
    return meta
