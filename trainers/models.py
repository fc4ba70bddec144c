"""Find and load base models once: a diffusers folder, a single .safetensors/.ckpt file (offline,
with a shipped config skeleton), the built-in tiny demo, or a hub id when online."""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.paths import REPO_DIR, Paths
from trainers import families
from trainers.families import FamilyError, file_family, folder_family, pipeline_class, \
    prediction_type_beside
from trainers.tiny_model import build_tiny_model

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
CONFIG_SKELETONS = REPO_DIR / "trainers" / "model_configs"


class ModelError(ValueError):
    pass


@dataclass
class BaseModel:
    name: str
    source: str
    tokenizer: Any
    text_encoder: Any
    unet: Any  # the denoiser: a U-Net, or a family's transformer (Family.denoiser)
    vae: Any
    scheduler_config: dict
    short_hash: str | None = None
    is_demo: bool = False
    family: str = "sd1"  # sd1 | sd2 | sdxl
    tokenizer_2: Any = None  # SDXL's second (OpenCLIP bigG) tokenizer and text encoder
    text_encoder_2: Any = None
    cache_key: tuple | None = None  # load_model's key, for give_back
    frozen_dtype: str = "fp32"  # what its weights are stored in (store_frozen_in)

    @property
    def spec(self):
        """Its family's adapter (trainers/families/)."""
        return families.get(self.family)

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def objective(self, flow=None, noise=None):
        """What the network is trained to predict and how latents are noised
        (trainers/objectives); `flow`: FlowMatchingOptions for a flow-matching family, `noise`:
        NoiseWeighting for a noise-prediction one."""
        return self.spec.objective(self.scheduler_config, flow, noise)

    def freeze(self) -> None:
        for module in (*self.text_encoders, self.unet, self.vae):
            module.requires_grad_(False)
            module.eval()


def list_models(paths: Paths) -> list[str]:
    """Names for the model dropdowns: what is on disk, then the demo models (SD1, SD2, SDXL)."""
    names = []
    root = paths.stable_diffusion
    if root.is_dir():
        for entry in sorted(root.iterdir(), key=lambda p: p.name.lower()):
            if entry.name in families.demo_families():
                continue
            if entry.is_dir() and (entry / "model_index.json").exists():
                names.append(entry.name)
            elif entry.is_file() and entry.suffix.lower() in SINGLE_FILE_SUFFIXES:
                names.append(entry.name)
    return names + list(families.demo_families())


def resolve_model(paths: Paths, name: str) -> tuple[str, Path | str]:
    """('demo'|'folder'|'file'|'hub', location) for a dropdown name, a path or a hub id."""
    name = name.strip()
    if not name:
        raise ModelError("model: choose a base model")
    if name in families.demo_families():
        return "demo", paths.cache / name
    candidate = paths.stable_diffusion / name
    if paths.confine:  # a shared app loads only what is inside the data folder
        candidate = paths.resolve(candidate, "model")
    if not candidate.exists():
        typed = Path(name).expanduser()
        candidate = typed if typed.is_absolute() else paths.data_dir / typed
        if paths.confine and candidate.exists():
            candidate = paths.resolve(name, "model")
    if candidate.is_dir():
        if not (candidate / "model_index.json").exists():
            raise ModelError(f"model: {candidate} is a folder without model_index.json "
                             "(not a diffusers model)")
        return "folder", candidate
    if candidate.is_file():
        if candidate.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelError(f"model: {candidate.name} is not a .safetensors or .ckpt file")
        return "file", candidate
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return "hub", name
    raise ModelError(f"model: {name!r} was not found in {paths.stable_diffusion}")


def file_short_hash(path: Path, cache_dir: Path) -> str:
    """A1111's short hash (first 10 hex of the file's sha256), remembered by size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir / "hashes.json"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        known[key] = digest.hexdigest()[:10]
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(known))
    return known[key]


def config_skeleton(paths: Paths, family: str = "sd1") -> Path:
    """A diffusers folder with configs and tokenizer but no weights, for from_single_file."""
    from trainers.tiny_model import write_tokenizers
    if not (CONFIG_SKELETONS / family).is_dir():
        raise ModelError(f"model: no config skeleton for family {family!r}")
    target = paths.cache / "configs" / family
    if not (target / "tokenizer" / "vocab.json").exists():
        shutil.copytree(CONFIG_SKELETONS / family, target, dirs_exist_ok=True)
        write_tokenizers(target, families.get(family))
    return target


def training_device():
    """The first CUDA GPU when there is one, else the CPU."""
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_problems(mixed_precision: str) -> list[str]:
    """Compute precisions this machine cannot train in: fp16 is for CUDA GPUs."""
    import torch
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        return ["mixed_precision: fp16 needs a CUDA GPU; choose bf16 (works on CPUs) or no"]
    return []


def _file_metadata(path: Path) -> dict:
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # an unreadable file fails later with diffusers' own message
        return {}


def single_file_config(paths: Paths, path: Path, family: str | None = None) -> Path:
    """The diffusers config a single file loads with: a demo model's for files Danlu trained
    from one (their metadata says which), else the shipped skeleton of the file's family."""
    base = _file_metadata(path).get("danlu.base_config")
    if base in families.demo_families():
        return build_tiny_model(paths.cache / base, family=families.demo_families()[base])
    return config_skeleton(paths, family or file_family(path))


@dataclass
class _Parts:
    """What a job that changed some weights gave back: the modules it left as loaded."""
    components: dict[str, Any]
    frozen_dtype: str = "fp32"  # what they are stored in; reused only by a load of the same


_cache_lock = threading.Lock()
_cache: dict[tuple, BaseModel | _Parts] = {}
REUSABLE = ("tokenizer", "tokenizer_2", "vae", "text_encoder", "text_encoder_2")


def load_model(paths: Paths, name: str, exclusive: bool = False,
               frozen_dtype: str = "fp32") -> BaseModel:
    """Load (or return the cached) base model; only one model is kept in memory.

    `exclusive` hands the model over and drops it from the cache, for a job that changes its
    weights (DreamBooth); the next caller loads a fresh copy of what that job changed and
    reuses what it gave back (`give_back`). `frozen_dtype` "bf16" / "fp16" stores its weights
    in half precision (store_frozen_in); a cached model stored otherwise is loaded again."""
    kind, location = resolve_model(paths, name)
    key = _cache_key(kind, location)
    with _cache_lock:
        entry = _cache.get(key)
        if isinstance(entry, BaseModel) and entry.frozen_dtype == frozen_dtype:
            return _cache.pop(key) if exclusive else entry
        reuse = entry.components if isinstance(entry, _Parts) \
            and entry.frozen_dtype == frozen_dtype else {}
        model = _load(paths, name, kind, location, reuse=reuse)
        store_frozen_in(model, frozen_dtype)  # on the CPU: the GPU never holds an fp32 copy
        _to_training_device(model)
        model.cache_key = key
        _cache.clear()
        if not exclusive:
            _cache[key] = model
        return model


HALF = {"bf16": "bfloat16", "fp16": "float16"}


def _to_training_device(model: BaseModel) -> None:
    """The model's modules onto the GPU (when there is one), once they are in the precision the
    run stores them in: a Flux.1 transformer is 48 GB in fp32 and 12 GB in fp8."""
    device = training_device()
    for module in (model.unet, model.vae, *model.text_encoders):
        if module is not None:
            module.to(device)


def store_frozen_in(model: BaseModel, dtype: str) -> None:
    """Store a frozen model's weights in the training precision ("bf16" / "fp16"), as kohya and
    diffusers do: half the bytes, and what trains (LoRA factors) is added in fp32 afterwards.
    The VAE stays fp32 under fp16 (kohya's no_half_vae: SDXL's VAE overflows in fp16). "fp8"
    (kohya's fp8_base) stores the denoiser's Linear / conv weights in 8 bits
    (trainers/fp8_weights.py) and everything else in bf16."""
    if dtype == "fp32":
        return
    if dtype not in (*HALF, "fp8"):
        raise ModelError(f"frozen weights: unknown precision {dtype!r} (fp32, bf16, fp16 or fp8)")
    import torch
    half = getattr(torch, HALF.get(dtype, "bfloat16"))
    for module in (model.unet, *model.text_encoders) + ((model.vae,) if dtype != "fp16" else ()):
        module.to(half)
    if dtype == "fp8":  # the denoiser's Linear / conv weights in 8 bits, the rest in bf16
        from trainers.fp8_weights import store_fp8
        store_fp8(model.unet)
    model.frozen_dtype = dtype


# keys a single file carries to say how it was trained (sd-scripts and ComfyUI write and read
# them; NoobAI-XL v-pred has both): empty tensors named `v_pred` and `ztsnr`
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"


def overridden(scheduler_config: dict, overrides: dict) -> dict:
    """A scheduler config with `overrides` that every scheduler built from it keeps: diffusers
    gives the keys a loaded config lists in `_use_default_values` the new class's defaults."""
    if not overrides:
        return scheduler_config
    defaulted = [k for k in scheduler_config.get("_use_default_values", []) if k not in overrides]
    return {**scheduler_config, **overrides, "_use_default_values": defaulted}


def schedule_markers(path: Path) -> dict:
    """The scheduler settings a single file's marker keys imply: a v target, zero terminal
    SNR (with trailing timestep spacing, as samplers need it)."""
    if path.suffix.lower() != ".safetensors":  # a .ckpt is read whole; only headers here
        return {}
    try:
        keys = families.safetensors_shapes(path)
    except Exception:  # an unreadable file fails later with diffusers' own message
        return {}
    marked = {}
    if V_PRED_KEY in keys:
        marked["prediction_type"] = "v_prediction"
    if ZTSNR_KEY in keys:
        marked.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return marked


def _cache_key(kind: str, location) -> tuple:
    key_extra = ()
    if kind in ("folder", "file"):
        key_extra = (Path(location).stat().st_mtime_ns,)
    return (kind, str(location)) + key_extra


def cached_model(paths: Paths, name: str) -> BaseModel | None:
    """The model load_model would return without loading anything, or None when it is not
    in this process's cache."""
    kind, location = resolve_model(paths, name)
    with _cache_lock:
        entry = _cache.get(_cache_key(kind, location))
    return entry if isinstance(entry, BaseModel) and entry.frozen_dtype == "fp32" else None


def give_back(model: BaseModel, changed: set[str]) -> None:
    """After an exclusive job: keep the modules it did not change (tokenizers, the VAE, frozen
    text encoders), so the next load of the same model reads only the changed ones from disk.
    Nothing is kept when another model was loaded meanwhile (one model in memory)."""
    parts = {name: getattr(model, name) for name in REUSABLE
             if name not in changed and getattr(model, name) is not None}
    with _cache_lock:
        if model.cache_key is None or _cache:
            return
        _cache[model.cache_key] = _Parts(parts, model.frozen_dtype)


def _quiet_libraries() -> None:
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(paths: Paths, name: str, kind: str, location, reuse: dict | None = None) -> BaseModel:
    """`reuse`: components already in memory, handed to diffusers instead of loading them."""
    _quiet_libraries()
    reuse = dict(reuse or {})

    short_hash = None
    prediction_type = None
    marked: dict = {}
    try:
        if kind == "demo":
            family = families.demo_families()[name.strip()]
            build_tiny_model(Path(location), family=family)
        elif kind == "folder":
            family = folder_family(location)
        elif kind == "file":
            family = file_family(location)
            if not families.get(family).single_file and not families.get(family).transformer_file:
                raise ModelError(
                    f"model: {Path(location).name} is a {families.get(family).label} file in "
                    "the original layout; Danlu loads this family from a diffusers folder "
                    f"({families.get(family).pipeline} layout) for now")
        else:
            family = None
        if kind in ("demo", "folder"):
            pipe = _pretrained(family, location, local_files_only=True, **reuse)
        elif kind == "file" and families.get(family).transformer_file:
            pipe = _transformer_file_pipeline(paths, Path(location), family, reuse)
            short_hash = file_short_hash(Path(location), paths.cache)
        elif kind == "file":
            path = Path(location)
            if path.suffix.lower() == ".ckpt":
                from trainers.formats.safe_load import safe_torch_load
                safe_torch_load(path)  # refuse pickles that carry code before diffusers reads it
            config = single_file_config(paths, path, family)
            pipe = pipeline_class(family).from_single_file(
                str(path), config=str(config), local_files_only=True,
                **families.get(family).pipeline_kwargs(), **reuse)
            prediction_type = prediction_type_beside(path)
            marked = schedule_markers(path)
            short_hash = file_short_hash(path, paths.cache)
        else:
            from diffusers import DiffusionPipeline
            pipe = DiffusionPipeline.from_pretrained(location, safety_checker=None, **reuse)
            family = families.pipeline_family(pipe)
    except ModelError:
        raise
    except FamilyError as error:
        raise ModelError(str(error)) from error
    except Exception as error:
        from trainers.formats.safe_load import explain_refusal  # says which file, and why
        refused = explain_refusal(error, Path(location) if kind in ("demo", "folder") else None)
        raise ModelError(f"model: could not load {name!r}: "
                         f"{refused or f'{type(error).__name__}: {error}'}") from error
    scheduler_config = dict(pipe.scheduler.config)
    if prediction_type:
        scheduler_config["prediction_type"] = prediction_type
    scheduler_config = overridden(scheduler_config, marked)
    model = BaseModel(name=name, source=str(location), tokenizer=pipe.tokenizer,
                      text_encoder=pipe.text_encoder,
                      unet=getattr(pipe, families.get(family).denoiser),
                      vae=_training_vae(families.get(family), pipe.vae),
                      scheduler_config=scheduler_config, short_hash=short_hash,
                      is_demo=kind == "demo", family=family,
                      tokenizer_2=getattr(pipe, "tokenizer_2", None),
                      text_encoder_2=getattr(pipe, "text_encoder_2", None))
    model.freeze()
    return model


def _transformer_file_pipeline(paths: Paths, path: Path, family: str, reuse: dict):
    """A flow family's transformer-only file with the rest of a matching diffusers folder."""
    from trainers.transformer_file import TransformerFileError, companion_folder, load_transformer
    try:
        folder = companion_folder(paths, path, family)
    except TransformerFileError as error:
        raise ModelError(str(error)) from error
    from trainers.formats.quantized_weights import QuantizedFileError
    try:
        transformer = load_transformer(path, family, folder)
    except QuantizedFileError as error:
        raise ModelError(f"model: {path.name}: {error}") from error
    return _pretrained(family, folder, local_files_only=True, transformer=transformer, **reuse)


def _training_vae(spec, vae):
    return spec.hook("training_vae")(vae) if spec.training_vae else vae


def _pretrained(family: str, location, **kwargs):
    return pipeline_class(family).from_pretrained(
        location, **families.get(family).pipeline_kwargs(), **kwargs)
