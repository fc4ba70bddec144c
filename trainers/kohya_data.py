"""Datasets the kohya sd-scripts way: repeats folders or a dataset TOML, captions with
shuffle/keep/dropout rules, aspect-ratio buckets, cached latents, and batches by micro-step.

Two ways to describe a dataset:
- folders `<repeats>_<class tokens>` under a training folder (`20_sks dog`: 20 repeats, images
  without a caption file are captioned "sks dog"), and optionally under a regularization folder;
- a kohya dataset TOML: `[general]` (defaults for everything), `[[datasets]]` (resolution,
  batch_size, bucketing, and subset defaults) and `[[datasets.subsets]]` (image_dir,
  num_repeats, captions, augmentation, is_reg). Values fall back subset -> dataset -> general ->
  caller defaults -> built-in defaults. Unknown keys and wrong types are errors naming the key
  and its table.

Regularization (`is_reg`) images are kept apart (`KohyaDataset.reg_images`) and, as kohya does,
trained in the same buckets with their repeats topped up until they match the number of
training images (with repeats); their loss is weighted by `prior_loss_weight`.

Latents are encoded once per (image, flip) at the image's bucket size, kept in memory or in
kohya's cache file `<stem>.npz` beside the image (keys `latents`, `original_size` [w, h],
`crop_ltrb`, plus `latents_flipped` with flip_aug and `alpha_mask` with alpha_mask; latents are
stored unscaled, [4, h/8, w/8]) and reused when the file matches the bucket size.
`KohyaBatches.batch(m)` is a pure function of (seed, m): resumed runs repeat exactly."""
from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.atomic import atomic_write
from core.config import ConfigError
from core.images import IMAGE_EXTENSIONS, ImageError, describe_skipped, list_images, scan_folder
from trainers import latent_memo, masks, seeds
from trainers.buckets import BucketBatcher, BucketError, Placement, assign, kohya_crop_ltrb, make_buckets
from trainers.data import DatasetError, open_training_image
from trainers.loop import Batch
from trainers.validation import ValidationError, check_split, split_indices

FOLDER_NAME = re.compile(r"^(\d+)_(.*)$", re.DOTALL)
INTERPOLATIONS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
                  "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
                  "area": Image.Resampling.BOX, "box": Image.Resampling.BOX}


# ----------------------------------------------------------------------------- configuration

@dataclass
class SubsetConfig:
    image_dir: Path
    num_repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    enable_wildcard: bool = False
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    is_reg: bool = False
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    conditioning_data_dir: Path | None = None  # masks of masked_loss (trainers/masks.py)


@dataclass
class DatasetConfig:
    subsets: list[SubsetConfig]
    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0  # a share of each training subset held out (validation loss)
    validation_seed: int | None = None  # which images are held out; None: the training seed
    notes: list[str] = field(default_factory=list)


# key -> kind. Subset keys that [general] and [[datasets]] may also set as defaults:
SUBSET_DEFAULT_KEYS = {
    "num_repeats": "int", "class_tokens": "str", "caption_extension": "str",
    "shuffle_caption": "bool", "keep_tokens": "int", "caption_separator": "str",
    "keep_tokens_separator": "str", "secondary_separator": "str", "enable_wildcard": "bool",
    "caption_prefix": "str", "caption_suffix": "str", "caption_dropout_rate": "float",
    "caption_dropout_every_n_epochs": "int", "caption_tag_dropout_rate": "float",
    "flip_aug": "bool", "resize_interpolation": "str",
    # kohya keys Danlu reads but only accepts at their neutral value (see UNSUPPORTED)
    "color_aug": "bool", "random_crop": "bool", "face_crop_aug_range": "float_pair",
    "token_warmup_min": "int", "token_warmup_step": "float", "cache_info": "bool",
    "custom_attributes": "table",
}
SUBSET_ONLY_KEYS = {"image_dir": "str", "is_reg": "bool", "alpha_mask": "bool",
                    "metadata_file": "str", "conditioning_data_dir": "str"}
DATASET_KEYS = {
    "resolution": "resolution", "batch_size": "int", "enable_bucket": "bool",
    "min_bucket_reso": "int", "max_bucket_reso": "int", "bucket_reso_steps": "int",
    "bucket_no_upscale": "bool", "validation_split": "float", "validation_seed": "int",
    "network_multiplier": "float",
}
# kohya features that need per-step image work (Danlu always trains from cached latents) or
# another kind of dataset: accepted only at the value that turns them off.
UNSUPPORTED = {
    "color_aug": (lambda v: v is False,
                  "color augmentation changes pixels every step, so latents could not be "
                  "cached (kohya refuses it with cached latents too); set it to false"),
    "random_crop": (lambda v: v is False,
                    "random crops change every step, so latents could not be cached (kohya "
                    "refuses it with cached latents too); set it to false"),
    "face_crop_aug_range": (lambda v: v is None, "face-crop augmentation is not supported"),
    "token_warmup_step": (lambda v: v == 0, "token warmup is not supported; set it to 0"),
    "token_warmup_min": (lambda v: True, ""),
    "network_multiplier": (lambda v: v == 1, "per-dataset network multipliers are not "
                                             "supported; set it to 1.0"),
    "metadata_file": (lambda v: v is None, "metadata JSON subsets are not supported in a "
                                           "dataset TOML; use the fine_tune method (in_json)"),
    "cache_info": (lambda v: True, ""),
    "custom_attributes": (lambda v: True, ""),
}
GENERAL_KEYS = {**DATASET_KEYS, **SUBSET_DEFAULT_KEYS}
DATASET_TABLE_KEYS = {**DATASET_KEYS, **SUBSET_DEFAULT_KEYS, "subsets": "subsets"}
SUBSET_KEYS = {**SUBSET_DEFAULT_KEYS, **SUBSET_ONLY_KEYS}
KIND_TEXT = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "resolution": "an integer or [width, height]", "float_pair": "[min, max] numbers",
             "table": "a table", "subsets": "an array of [[datasets.subsets]] tables"}


def _check_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "table":
        return isinstance(value, dict)
    if kind == "subsets":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    if kind == "resolution":
        if _check_kind(value, "int"):
            return True
        return (isinstance(value, list) and len(value) == 2
                and all(_check_kind(v, "int") for v in value))
    if kind == "float_pair":
        return (isinstance(value, list) and len(value) == 2
                and all(_check_kind(v, "float") for v in value))
    raise AssertionError(kind)


def _check_table(table: dict, allowed: dict[str, str], where: str, problems: list[str]) -> None:
    for key, value in table.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}: unknown key {key!r}{hint}")
        elif not _check_kind(value, allowed[key]):
            problems.append(f"{where}: {key!r} must be {KIND_TEXT[allowed[key]]}, "
                            f"got {type(value).__name__} {value!r}")
        elif key in UNSUPPORTED and not UNSUPPORTED[key][0](value):
            problems.append(f"{where}: {key!r} = {value!r}: {UNSUPPORTED[key][1]}")


def _pick(key: str, layers: Sequence[dict], default: Any) -> Any:
    for layer in layers:
        if layer.get(key) is not None:
            return layer[key]
    return default


def _resolution(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _build_subset(table: dict, layers: Sequence[dict], base_dir: Path, where: str,
                  problems: list[str]) -> SubsetConfig | None:
    chain = [table, *layers]
    image_dir = table.get("image_dir")
    if image_dir is None:
        problems.append(f"{where}: 'image_dir' is required")
        return None
    values = {}
    for f in fields(SubsetConfig):
        if f.name == "image_dir":
            continue
        values[f.name] = _pick(f.name, chain, f.default)
    path = Path(image_dir).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if values["conditioning_data_dir"] is not None:
        masks = Path(values["conditioning_data_dir"]).expanduser()
        values["conditioning_data_dir"] = masks if masks.is_absolute() else base_dir / masks
    subset = SubsetConfig(image_dir=path, **values)
    _validate_subset(subset, where, problems)
    return subset


def _validate_subset(s: SubsetConfig, where: str, problems: list[str]) -> None:
    if s.conditioning_data_dir is not None and s.alpha_mask:
        problems.append(f"{where}: 'conditioning_data_dir' (mask images) and 'alpha_mask' are "
                        "two mask sources; keep one")
    if s.num_repeats < 1:
        problems.append(f"{where}: 'num_repeats' must be at least 1, got {s.num_repeats}")
    if s.keep_tokens < 0:
        problems.append(f"{where}: 'keep_tokens' must not be negative, got {s.keep_tokens}")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        value = getattr(s, key)
        if not 0.0 <= value <= 1.0:
            problems.append(f"{where}: {key!r} must be between 0 and 1, got {value}")
    if s.caption_dropout_every_n_epochs < 0:
        problems.append(f"{where}: 'caption_dropout_every_n_epochs' must not be negative")
    if not s.caption_extension.startswith(".") or len(s.caption_extension) < 2:
        problems.append(f"{where}: 'caption_extension' must start with a dot, like '.txt', got "
                        f"{s.caption_extension!r}")
    if not s.caption_separator:
        problems.append(f"{where}: 'caption_separator' must not be empty")
    if s.resize_interpolation is not None and s.resize_interpolation not in INTERPOLATIONS:
        problems.append(f"{where}: 'resize_interpolation' must be one of "
                        f"{', '.join(INTERPOLATIONS)}, got {s.resize_interpolation!r}")


def _build_dataset(table: dict, layers: Sequence[dict], subsets: list[SubsetConfig], where: str,
                   problems: list[str]) -> DatasetConfig:
    chain = [table, *layers]
    values = {}
    for f in fields(DatasetConfig):
        if f.name in ("subsets", "notes"):
            continue
        values[f.name] = _pick(f.name, chain, f.default)
    values["resolution"] = _resolution(values["resolution"])
    config = DatasetConfig(subsets=subsets, **values)
    _validate_dataset(config, where, problems)
    return config


def _validate_dataset(d: DatasetConfig, where: str, problems: list[str]) -> None:
    w, h = d.resolution
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        problems.append(f"{where}: 'resolution' sides must be positive multiples of 8, got "
                        f"{w}x{h}")
    if d.batch_size < 1:
        problems.append(f"{where}: 'batch_size' must be at least 1, got {d.batch_size}")
    problems += [f"{where}: {p}" for p in check_split(d.validation_split)]
    if d.bucket_reso_steps < 8 or d.bucket_reso_steps % 8:
        problems.append(f"{where}: 'bucket_reso_steps' must be a positive multiple of 8 (kohya "
                        f"asks 64 for SD1/2, 32 for SDXL), got {d.bucket_reso_steps}")
        return
    if d.enable_bucket and not d.bucket_no_upscale:
        step = d.bucket_reso_steps
        asked_min = d.min_bucket_reso
        # kohya rounds min down and max up to the step, with a warning
        if d.min_bucket_reso % step:
            rounded = d.min_bucket_reso - d.min_bucket_reso % step
            d.notes.append(f"min_bucket_reso {d.min_bucket_reso} rounded down to {rounded}")
            d.min_bucket_reso = rounded
        if d.max_bucket_reso % step:
            rounded = d.max_bucket_reso + step - d.max_bucket_reso % step
            d.notes.append(f"max_bucket_reso {d.max_bucket_reso} rounded up to {rounded}")
            d.max_bucket_reso = rounded
        if d.min_bucket_reso <= 0:
            problems.append(f"{where}: 'min_bucket_reso' must be at least one bucket step "
                            f"(bucket_reso_steps = {step}), got {asked_min}")
        if min(w, h) < d.min_bucket_reso:
            problems.append(f"{where}: 'min_bucket_reso' ({d.min_bucket_reso}) must not be "
                            f"larger than the resolution's shorter side ({min(w, h)})")
        if max(w, h) > d.max_bucket_reso:
            problems.append(f"{where}: 'max_bucket_reso' ({d.max_bucket_reso}) must not be "
                            f"smaller than the resolution's longer side ({max(w, h)})")
    elif d.enable_bucket:
        d.notes.append("bucket_no_upscale: min/max_bucket_reso are ignored, buckets follow the "
                       "image sizes")


def parse_dataset_toml(text: str, base_dir: Path | str = ".", defaults: dict | None = None,
                       source: str = "dataset config",
                       masked_loss: bool = False) -> list[DatasetConfig]:
    """Parse and validate a kohya dataset TOML. Relative image_dir paths are taken relative to
    `base_dir` (the TOML's folder). `defaults` plays the role of kohya's command-line values.
    A subset's `conditioning_data_dir` is its mask folder, read with `masked_loss` on (kohya
    reads it as a ControlNet dataset then); otherwise it is refused."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from None
    defaults = dict(defaults or {})
    problems: list[str] = []
    _check_table(defaults, {**GENERAL_KEYS, **SUBSET_ONLY_KEYS}, "defaults", problems)
    for key in data:
        if key not in ("general", "datasets"):
            problems.append(f"{source}: unknown table or key {key!r} (expected [general] and "
                            "[[datasets]])")
    general = data.get("general", {})
    if not isinstance(general, dict):
        problems.append(f"{source}: 'general' must be a [general] table")
        general = {}
    _check_table(general, GENERAL_KEYS, "[general]", problems)
    tables = data.get("datasets", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.append(f"{source}: 'datasets' must be [[datasets]] tables")
        tables = []
    if not tables and not problems:
        problems.append(f"{source}: no [[datasets]] table")
    datasets = []
    for i, table in enumerate(tables, 1):
        where = f"[[datasets]] #{i}"
        before = len(problems)
        _check_table(table, DATASET_TABLE_KEYS, where, problems)
        subset_tables = table.get("subsets", [])
        if not _check_kind(subset_tables, "subsets"):
            subset_tables = []
        if not subset_tables and len(problems) == before:
            problems.append(f"{where}: no [[datasets.subsets]] table")
        subsets = []
        for j, subset_table in enumerate(subset_tables, 1):
            swhere = f"[[datasets.subsets]] #{j} of [[datasets]] #{i}"
            start = len(problems)
            _check_table(subset_table, SUBSET_KEYS, swhere, problems)
            if "conditioning_data_dir" in subset_table and not masked_loss:
                problems.append(f"{swhere}: 'conditioning_data_dir' is read as the subset's mask "
                                "folder with masked_loss on (ControlNet datasets are not "
                                "supported); tick masked loss or remove it")
            if len(problems) == start:
                subset = _build_subset(subset_table, [table, general, defaults],
                                       Path(base_dir), swhere, problems)
                if subset is not None:
                    subsets.append(subset)
        if len(problems) == before:
            datasets.append(_build_dataset(table, [general, defaults], subsets, where, problems))
    if problems:
        raise ConfigError(problems)
    return datasets


def load_dataset_toml(path: Path | str, defaults: dict | None = None,
                      masked_loss: bool = False) -> list[DatasetConfig]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset_config: {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"dataset_config: cannot read {path} ({error})") from None
    return parse_dataset_toml(text, path.parent, defaults, source=f"dataset_config {path.name}",
                              masked_loss=masked_loss)


def parse_folder_name(name: str) -> tuple[int, str]:
    """`20_sks dog` -> (20, "sks dog"); the class tokens are everything after the first `_`."""
    match = FOLDER_NAME.match(name)
    if not match:
        raise ValueError(f"folder {name!r} is not named <repeats>_<class tokens>, like "
                         "'20_sks dog'")
    repeats = int(match.group(1))
    if repeats < 1:
        raise ValueError(f"folder {name!r}: repeats must be at least 1")
    return repeats, match.group(2)


def folder_subsets(folder: Path | str, is_reg: bool, field_name: str, notes: list[str],
                   options: dict, plain_tokens: str | None = None) -> list[SubsetConfig]:
    """Subsets from `<repeats>_<class tokens>` sub-folders; a folder that has none but holds
    images is one subset with 1 repeat, captioned by its caption files or `plain_tokens`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{field_name}: {folder} is not a folder")
    subsets = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            repeats, tokens = parse_folder_name(sub.name)
        except ValueError as error:
            notes.append(f"{field_name}: ignored {error}")
            continue
        subsets.append(SubsetConfig(image_dir=sub, **{**options, "num_repeats": repeats,
                                                      "class_tokens": tokens, "is_reg": is_reg}))
    loose = list_images(folder)
    if subsets and loose:
        shown = describe_skipped([(p.name, "an image beside <repeats>_<tokens> sub-folders")
                                  for p in loose])
        notes.append(f"{field_name}: {shown}; only the sub-folders' images are used")
    if not subsets and loose:
        subsets.append(SubsetConfig(image_dir=folder, **{**options, "num_repeats": 1,
                                                         "class_tokens": plain_tokens or None,
                                                         "is_reg": is_reg}))
    if not subsets:
        raise DatasetError(f"{field_name}: {folder} has no images and no sub-folder named "
                           "<repeats>_<class tokens> (for example '20_sks dog')")
    return subsets


def folder_dataset(train_data_dir: Path | str, reg_data_dir: Path | str | None = None,
                   train_tokens: str | None = None, reg_tokens: str | None = None,
                   mask_dir: Path | None = None, **options) -> DatasetConfig:
    """A dataset from kohya's repeats folders. `options` are any [general] keys (resolution,
    batch_size, enable_bucket, shuffle_caption, keep_tokens, flip_aug, ...) and alpha_mask.
    `mask_dir` holds the training images' masks (masked_loss): a sub-folder's in the mask
    folder's sub-folder of the same name when there is one, else in the mask folder itself;
    regularization images train unmasked."""
    problems: list[str] = []
    _check_table(options, {**GENERAL_KEYS, "alpha_mask": "bool"}, "options", problems)
    for key in ("num_repeats", "class_tokens"):
        if key in options:
            problems.append(f"options: {key!r} comes from the folder names")
    if problems:
        raise ConfigError(problems)
    subset_options = {f.name: options[f.name] for f in fields(SubsetConfig) if f.name in options}
    notes: list[str] = []
    subsets = folder_subsets(train_data_dir, False, "train_data_dir", notes, subset_options,
                             train_tokens)
    if mask_dir is not None:
        for subset in subsets:
            own = Path(mask_dir) / subset.image_dir.name
            subset.conditioning_data_dir = own if own.is_dir() else Path(mask_dir)
    if reg_data_dir:
        subsets += folder_subsets(reg_data_dir, True, "reg_data_dir", notes, subset_options,
                                  reg_tokens)
    for subset in subsets:
        _validate_subset(subset, f"folder {subset.image_dir.name}", problems)
    dataset = _build_dataset(options, [], subsets, "options", problems)
    if problems:
        raise ConfigError(problems)
    dataset.notes[:0] = notes
    return dataset


def plain_dataset(image_dir: Path | str, num_repeats: int = 1, mask_dir: Path | None = None,
                  **options) -> DatasetConfig:
    """A dataset of one subset, `image_dir` itself (fine-tuning: its captions come from a
    metadata JSON); `options` are [general] keys as for folder_dataset."""
    problems: list[str] = []
    _check_table(options, {**GENERAL_KEYS, "alpha_mask": "bool"}, "options", problems)
    if problems:
        raise ConfigError(problems)
    subset_options = {f.name: options[f.name] for f in fields(SubsetConfig)
                      if f.name in options and f.name != "num_repeats"}
    subset = SubsetConfig(image_dir=Path(image_dir), num_repeats=num_repeats,
                          conditioning_data_dir=mask_dir, **subset_options)
    _validate_subset(subset, "options", problems)
    dataset = _build_dataset(options, [], [subset], "options", problems)
    if problems:
        raise ConfigError(problems)
    return dataset


# ----------------------------------------------------------------------------- captions

def read_caption(image: Path, extension: str, enable_wildcard: bool = False) -> str | None:
    """The caption file `<stem><extension>` beside the image, or None. kohya reads the first
    line (all non-empty lines, joined by newlines, when wildcards are on)."""
    path = image.parent / (image.stem + extension)
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"caption file {path} is not UTF-8 text") from None
    if not lines:
        raise DatasetError(f"caption file {path} is empty; write a caption or delete the file "
                           "to use the class tokens")
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()


def _split(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def process_caption(subset: SubsetConfig, caption: str, rng, epoch: int = 1) -> str:
    """Apply prefix/suffix, caption dropout, wildcards, tag shuffle with keep_tokens and tag
    dropout, in kohya's order. `epoch` is 1-based (for caption_dropout_every_n_epochs)."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    if subset.enable_wildcard:
        if "\n" in caption:
            caption = rng.choice(caption.split("\n"))
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]
    separator = subset.caption_separator
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0:
        fixed, flexible, fixed_tail = [], [], []
        keep = subset.keep_tokens_separator
        if keep and keep in caption:
            head, flexible_part = caption.split(keep, 1)
            if keep in flexible_part:
                flexible_part, tail = flexible_part.split(keep, 1)
                fixed_tail = _split(tail, separator)
            fixed, flexible = _split(head, separator), _split(flexible_part, separator)
        else:
            tokens = [t.strip() for t in caption.strip().split(separator)]
            fixed, flexible = tokens[:subset.keep_tokens], tokens[subset.keep_tokens:]
        if subset.shuffle_caption:
            rng.shuffle(flexible)
        if subset.caption_tag_dropout_rate > 0:
            flexible = [t for t in flexible if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flexible + fixed_tail)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, separator)
    return caption


def _expand_wildcards(caption: str, rng) -> str:
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


# ----------------------------------------------------------------------------- scanning

@dataclass
class ImageEntry:
    path: Path
    subset: int  # index into the dataset's config.subsets
    caption: str  # the caption file's text, or the class tokens
    size: tuple[int, int]  # original (width, height), after EXIF rotation
    placement: Placement
    is_reg: bool
    repeats: int  # appearances per epoch (regularization images: topped up, 0 = unused)
    latents: torch.Tensor | None = None  # unscaled [C, h, w] (memory cache)
    latents_flipped: torch.Tensor | None = None
    alpha: torch.Tensor | None = None  # [H, W] in 0..1 at bucket size (alpha or mask file)
    npz: Path | None = None  # disk cache
    mask: Path | None = None  # the mask file of masked_loss


@dataclass
class KohyaDataset:
    config: DatasetConfig
    train_images: list[ImageEntry]
    reg_images: list[ImageEntry]
    img_counts: list[int]  # images found per subset
    buckets: list[tuple[int, int]]  # predefined buckets ([] with bucket_no_upscale)
    notes: list[str] = field(default_factory=list)
    validation_images: list[ImageEntry] = field(default_factory=list)  # held out, never trained

    @property
    def entries(self) -> list[ImageEntry]:
        """Every image that trains in an epoch (regularization images only when used)."""
        return self.train_images + [e for e in self.reg_images if e.repeats > 0]

    @property
    def num_train_images(self) -> int:
        return sum(e.repeats for e in self.train_images)

    @property
    def num_reg_images(self) -> int:  # as kohya reports it: found reg images x their repeats
        return sum(self.config.subsets[e.subset].num_repeats for e in self.reg_images)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image will be trained: after its EXIF rotation."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def _place(config: DatasetConfig, buckets: list, size: tuple[int, int]) -> Placement:
    if not config.enable_bucket:
        return assign(size, [config.resolution])
    return assign(size, buckets, no_upscale=config.bucket_no_upscale,
                  max_area=config.resolution[0] * config.resolution[1],
                  step=config.bucket_reso_steps)


def config_buckets(config: DatasetConfig) -> list[tuple[int, int]]:
    """The predefined buckets of a dataset's settings (none without bucketing, or with
    bucket_no_upscale, whose buckets follow each image); bad settings are a ConfigError."""
    if not config.enable_bucket or config.bucket_no_upscale:
        return []
    try:
        return make_buckets(config.resolution, config.min_bucket_reso, config.max_bucket_reso,
                            config.bucket_reso_steps)
    except BucketError as error:
        raise ConfigError(str(error)) from None


def scan_dataset(config: DatasetConfig, seed: int = 0) -> KohyaDataset:
    """Find images and captions, measure them and place them in buckets (no VAE needed); with
    validation_split, each training subset's held-out share is set apart (`seed`: the training
    seed, used when the dataset names no validation_seed)."""
    notes = list(config.notes)
    buckets = config_buckets(config)
    train, reg, counts, held = [], [], [], []
    for index, subset in enumerate(config.subsets):
        folder = subset.image_dir
        if not folder.is_dir():
            raise DatasetError(f"image_dir: {folder} is not a folder")
        scan = scan_folder(folder)
        files, skipped = scan.images, list(scan.skipped)
        entries, missing = [], 0
        for path in files:
            try:
                size = image_size(path)
                placement = _place(config, buckets, size)
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
                skipped.append((path.name, f"{error}"[:200]))
                continue
            caption = read_caption(path, subset.caption_extension, subset.enable_wildcard)
            if caption is None:
                missing += 1
                caption = subset.class_tokens or ""
            entries.append(ImageEntry(path=path, subset=index, caption=caption, size=size,
                                      placement=placement, is_reg=subset.is_reg,
                                      repeats=subset.num_repeats))
        if skipped:
            notes.append(f"{folder.name}: {describe_skipped(skipped)}")
        if subset.conditioning_data_dir is not None and entries:
            attach_masks(entries, subset.conditioning_data_dir)
        if not entries:
            kind = "regularization folder" if subset.is_reg else "image folder"
            detail = f" ({describe_skipped(skipped)})" if skipped else ""
            raise DatasetError(f"image_dir: the {kind} {folder} has no usable images{detail} "
                               f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        if missing:
            fallback = f"the class tokens {subset.class_tokens!r}" if subset.class_tokens else \
                "an empty caption"
            notes.append(f"{folder.name}: {missing} image(s) without a {subset.caption_extension} "
                         f"file use {fallback}")
        if config.validation_split and not subset.is_reg:
            entries = _split_off(entries, config, seed, held, folder.name)
        counts.append(len(entries))
        (reg if subset.is_reg else train).extend(entries)
    if not train:
        raise DatasetError("image_dir: no training images, only regularization images")
    dataset = KohyaDataset(config=config, train_images=train, reg_images=reg,
                           img_counts=counts, buckets=buckets, notes=notes,
                           validation_images=held)
    _balance_regularization(dataset)
    return dataset


def _split_off(entries: list[ImageEntry], config: DatasetConfig, seed: int,
               held: list[ImageEntry], name: str) -> list[ImageEntry]:
    """The subset's entries left to train on; its held-out ones go to `held`."""
    chosen = config.validation_seed if config.validation_seed is not None else seed
    try:
        keep, out = split_indices([e.path.name for e in entries], config.validation_split,
                                  chosen, where=f"validation_split ({name})")
    except ValidationError as error:
        raise DatasetError(str(error)) from None
    held.extend(entries[i] for i in out)
    return [entries[i] for i in keep]


def attach_masks(entries: list[ImageEntry], folder: Path) -> None:
    """Each image's mask file, which must have the image's size (kohya asserts both)."""
    try:
        found = masks.find_masks([e.path for e in entries], folder)
    except masks.MaskError as error:
        raise DatasetError(str(error)) from None
    for entry in entries:
        entry.mask = found[entry.path]
        try:
            size = image_size(entry.mask)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise DatasetError(f"conditioning_data_dir: mask {entry.mask}: {error}") from None
        if size != tuple(entry.size):
            raise DatasetError(f"conditioning_data_dir: mask {entry.mask} is {size[0]}x{size[1]}, "
                               f"its image {entry.path.name} is {entry.size[0]}x{entry.size[1]}; "
                               "a mask has its image's size")


def _balance_regularization(dataset: KohyaDataset) -> None:
    """kohya: regularization images are used (with their repeats, then one more repeat each in
    turn) until they match the training images with repeats; the rest are not used."""
    reg = dataset.reg_images
    if not reg:
        return
    target = dataset.num_train_images
    for entry in reg:
        entry.repeats = 0
    used, first = 0, True
    while used < target:
        for entry in reg:
            if first:
                entry.repeats = dataset.config.subsets[entry.subset].num_repeats
                used += entry.repeats
            else:
                entry.repeats += 1
                used += 1
            if used >= target:
                break
        first = False
    unused = sum(e.repeats == 0 for e in reg)
    if unused:
        dataset.notes.append(f"{unused} regularization image(s) are not used: there are more "
                             "than training images (with repeats)")


# ----------------------------------------------------------------------------- latents

def _vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _npz_path(image: Path) -> Path:
    return image.parent / (image.stem + ".npz")


def npz_matches(path: Path, entry: ImageEntry, scale: int, flip: bool, alpha: bool,
                mask: bool = False) -> bool:
    """kohya's test for a reusable cache file, plus the original size must match; a mask file's
    mask is kept under `mask` (Danlu's key: kohya reads mask files at each step)."""
    if not path.is_file():
        return False
    bw, bh = entry.placement.bucket
    expected = (bh // scale, bw // scale)
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            if not {"latents", "original_size", "crop_ltrb"} <= keys:
                return False
            if tuple(npz["latents"].shape[1:3]) != expected:
                return False
            if tuple(int(v) for v in npz["original_size"].tolist()) != tuple(entry.size):
                return False
            if flip and ("latents_flipped" not in keys
                         or tuple(npz["latents_flipped"].shape[1:3]) != expected):
                return False
            if alpha != ("alpha_mask" in keys):
                return False
            if alpha and tuple(npz["alpha_mask"].shape) != (bh, bw):
                return False
            if mask != ("mask" in keys) or (mask and tuple(npz["mask"].shape) != (bh, bw)):
                return False
    except (OSError, ValueError, KeyError, EOFError):
        return False
    return True


def _pixels(entry: ImageEntry, subset: SubsetConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image resized and centre-cropped to its bucket: ([3, H, W] in -1..1, alpha [H, W])."""
    try:
        image = open_training_image(entry.path, keep_alpha=subset.alpha_mask)
    except ImageError as error:  # a header that reads but pixels that do not (e.g. truncated)
        raise DatasetError(f"{entry.path}: {error}; remove or replace this file") from None
    if image.size != tuple(entry.size):
        raise DatasetError(f"{entry.path} changed while preparing the dataset "
                           f"({entry.size} -> {image.size})")
    placement = entry.placement
    if placement.resized != image.size:
        name = subset.resize_interpolation
        if name is None:
            shrinking = (image.width >= placement.resized[0]
                         and image.height >= placement.resized[1])
            name = "area" if shrinking else "lanczos"
        image = image.resize(placement.resized, INTERPOLATIONS[name])
    image = image.crop(placement.crop)
    array = np.asarray(image, dtype=np.float32)
    pixels = torch.from_numpy(array[..., :3] / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    alpha = torch.from_numpy(array[..., 3] / 255.0) if subset.alpha_mask else None
    if entry.mask is not None:  # the same resize and crop as the image
        try:
            mask = masks.open_mask(entry.mask, entry.size)
        except masks.MaskError as error:
            raise DatasetError(f"conditioning_data_dir: {error}") from None
        if placement.resized != mask.size:
            mask = mask.resize(placement.resized, INTERPOLATIONS[name])
        alpha = masks.as_weights(mask.crop(placement.crop))
    return pixels, alpha


def _distribution(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def _sample(mean: torch.Tensor, std: torch.Tensor, name: tuple, seed: int) -> torch.Tensor:
    """One image's latent (unscaled), with its own counter-based noise."""
    noise = torch.randn(mean.shape, generator=seeds.generator(seed, "latent", *name))
    latent = mean + std * noise
    if not torch.isfinite(latent).all():
        raise DatasetError(f"the VAE produced NaN/inf latents for {name[1]}")
    return latent


def _memo_key(entry: ImageEntry, subset) -> tuple | None:
    mask = latent_memo.image_key(entry.mask) if entry.mask is not None else ()
    if mask is None:
        return None
    return latent_memo.image_key(entry.path, entry.size, entry.placement, subset.flip_aug,
                                 subset.alpha_mask, subset.resize_interpolation, mask)


def _from_memo(vae, entry: ImageEntry, subset, seed: int) -> bool:
    """Fill an entry's latents from distributions kept from an earlier run; False if none."""
    kept = latent_memo.get(vae, _memo_key(entry, subset))
    if kept is None:
        return False
    mean, std, mirror_mean, mirror_std, alpha = kept
    name = (entry.path.parent.name, entry.path.name)
    entry.latents = _sample(mean, std, name + (False,), seed)
    entry.latents_flipped = (_sample(mirror_mean, mirror_std, name + (True,), seed)
                             if mirror_mean is not None else None)
    entry.alpha = alpha
    return True


def _save_npz(path: Path, latents, original_size, crop_ltrb, flipped, alpha,
              from_file: bool = False) -> None:
    arrays = {"latents": latents.numpy(), "original_size": np.array(original_size),
              "crop_ltrb": np.array(crop_ltrb)}
    if flipped is not None:
        arrays["latents_flipped"] = flipped.numpy()
    if alpha is not None:
        arrays["mask" if from_file else "alpha_mask"] = alpha.float().numpy()

    def write(temp: Path) -> None:
        with open(temp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def cache_latents(dataset: KohyaDataset, vae, seed: int = 0, cache_to_disk: bool = False,
                  vae_batch_size: int = 1,
                  report: Callable[[str], None] = lambda text: None) -> int:
    """Encode every used image (and its mirror image with flip_aug) at its bucket size once.
    Returns how many images went through the VAE (0 when every disk cache was reused)."""
    scale = _vae_scale(vae)
    todo: dict[tuple[int, int], list[ImageEntry]] = {}
    entries = dataset.entries + dataset.validation_images
    # one image per VAE call gives the same numbers in every run, so earlier ones can be reused
    memo = not cache_to_disk and vae_batch_size <= 1
    for entry in entries:
        subset = dataset.config.subsets[entry.subset]
        bw, bh = entry.placement.bucket
        if bw % scale or bh % scale:
            raise DatasetError(f"bucket {bw}x{bh} for {entry.path.name} is not a multiple of the "
                               f"VAE's factor {scale}; check resolution and bucket_reso_steps")
        if cache_to_disk:
            entry.npz = _npz_path(entry.path)
            if npz_matches(entry.npz, entry, scale, subset.flip_aug, subset.alpha_mask,
                           entry.mask is not None):
                continue
        elif entry.latents is not None:
            continue
        elif memo and _from_memo(vae, entry, subset, seed):
            continue
        todo.setdefault(entry.placement.bucket, []).append(entry)
    total = sum(len(group) for group in todo.values())
    done = 0
    for bucket in sorted(todo):
        group = todo[bucket]
        for start in range(0, len(group), max(1, vae_batch_size)):
            chunk = group[start:start + max(1, vae_batch_size)]
            subsets = [dataset.config.subsets[e.subset] for e in chunk]
            prepared = [_pixels(e, s) for e, s in zip(chunk, subsets)]
            pixels = torch.stack([p for p, _ in prepared])
            names = [(e.path.parent.name, e.path.name) for e in chunk]
            mean, std = _distribution(vae, pixels)
            latents = [_sample(mean[i], std[i], n + (False,), seed) for i, n in enumerate(names)]
            flipped: list = [None] * len(chunk)
            mirror: list = [(None, None)] * len(chunk)
            flip_rows = [i for i, s in enumerate(subsets) if s.flip_aug]
            if flip_rows:
                m_mean, m_std = _distribution(vae, torch.flip(pixels[flip_rows], dims=[3]))
                for row, i in enumerate(flip_rows):
                    mirror[i] = (m_mean[row], m_std[row])
                    flipped[i] = _sample(m_mean[row], m_std[row], names[i] + (True,), seed)
            if memo:
                for i, (entry, subset) in enumerate(zip(chunk, subsets)):
                    latent_memo.put(vae, _memo_key(entry, subset),
                                    (mean[i], std[i], *mirror[i], prepared[i][1]))
            for entry, (_, alpha), latent, mirror in zip(chunk, prepared, latents, flipped):
                if cache_to_disk:
                    _save_npz(entry.npz, latent, entry.size,
                              kohya_crop_ltrb(entry.placement.bucket, entry.size), mirror, alpha,
                              entry.mask is not None)
                else:
                    entry.latents, entry.latents_flipped, entry.alpha = latent, mirror, alpha
            done += len(chunk)
            report(f"Caching latents: {done}/{total} images")
    return total


def _load_latents(entry: ImageEntry, flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if entry.npz is not None and entry.latents is None:
        with np.load(entry.npz) as npz:
            latents = torch.from_numpy(npz["latents_flipped" if flipped else "latents"].copy())
            key = "mask" if entry.mask is not None else "alpha_mask"
            alpha = torch.from_numpy(npz[key].copy()) if key in npz.files else None
    else:
        if entry.latents is None:
            raise RuntimeError(f"latents of {entry.path} are not cached; call cache_latents")
        latents = entry.latents_flipped if flipped else entry.latents
        alpha = entry.alpha
    if flipped and alpha is not None:
        alpha = torch.flip(alpha, dims=[1])
    return latents.float(), alpha


# ----------------------------------------------------------------------------- batches

def _size_info(entry: ImageEntry) -> tuple:
    """SDXL's size conditioning of an image as kohya computes it: original (h, w), the top-left
    of `crop_ltrb` (kohya_crop_ltrb, the same numbers as in its latent cache) and the bucket."""
    bucket = entry.placement.bucket
    left, top, _, _ = kohya_crop_ltrb(bucket, entry.size)
    return ((entry.size[1], entry.size[0]), (int(top), int(left)), (bucket[1], bucket[0]))


class KohyaBatches:
    """The BatchSource of kohya datasets: batches inside one bucket of one dataset; an epoch
    holds every image x its repeats; batch(m) is a pure function of (seed, m)."""

    def __init__(self, datasets: KohyaDataset | Sequence[KohyaDataset], seed: int,
                 scaling_factor: float = 0.18215, prior_loss_weight: float = 1.0,
                 shift_factor: float = 0.0, validation: Sequence[KohyaDataset] = ()):
        self.datasets = [datasets] if isinstance(datasets, KohyaDataset) else list(datasets)
        if not self.datasets:
            raise DatasetError("no dataset")
        self.seed = seed
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor  # Flux's VAE: latents are (mean - shift) * scale
        self.prior_loss_weight = prior_loss_weight
        self.validation = list(validation)  # datasets of a validation folder
        self.batchers = []
        for number, dataset in enumerate(self.datasets):
            items = [(key, entry.placement.bucket)
                     for key, entry in enumerate(dataset.entries) for _ in range(entry.repeats)]
            self.batchers.append(BucketBatcher(items, dataset.config.batch_size, seed,
                                               salt=number))
        self._entries = [d.entries for d in self.datasets]
        self.batches_per_epoch = sum(b.batches_per_epoch for b in self.batchers)
        self._epoch = lru_cache(maxsize=2)(self._make_epoch)

    def _make_epoch(self, epoch: int) -> list[tuple[int, list[int]]]:
        order = [(number, keys) for number, batcher in enumerate(self.batchers)
                 for _, keys in batcher.epoch(epoch)]
        if len(self.batchers) > 1:
            seeds.rng(self.seed, "datasets", epoch).shuffle(order)
        return order

    def plan(self, micro: int) -> tuple[int, int, int, list[int]]:
        """(epoch, index in epoch, dataset number, entry indices) of micro-batch `micro`."""
        epoch, within = divmod(micro, self.batches_per_epoch)
        number, keys = self._epoch(epoch)[within]
        return epoch, within, number, keys

    def batch(self, micro: int) -> Batch:
        epoch, within, number, keys = self.plan(micro)
        dataset = self.datasets[number]
        latents, texts, alphas, weights, sizes = [], [], [], [], []
        for position, key in enumerate(keys):
            entry = self._entries[number][key]
            subset = dataset.config.subsets[entry.subset]
            rng = seeds.rng(self.seed, "sample", epoch, within, position)
            flipped = subset.flip_aug and rng.random() < 0.5
            latent, alpha = _load_latents(entry, flipped)
            latents.append(latent)
            alphas.append(alpha)
            texts.append(process_caption(subset, entry.caption, rng, epoch + 1))
            weights.append(self.prior_loss_weight if entry.is_reg else 1.0)
            sizes.append(_size_info(entry))
        stacked = torch.stack(latents)
        if self.shift_factor:
            stacked = stacked - self.shift_factor
        stacked = stacked * self.scaling_factor
        return Batch(latents=stacked, texts=texts,
                     weights=self._weights(weights, alphas, stacked.shape[-2:]), sizes=sizes)

    @staticmethod
    def _weights(per_sample: list[float], alphas: list, size) -> torch.Tensor | None:
        has_alpha = any(a is not None for a in alphas)
        if not has_alpha and all(w == 1.0 for w in per_sample):
            return None
        weight = torch.tensor(per_sample, dtype=torch.float32).view(-1, 1, 1, 1)
        if has_alpha:
            masks = []
            for alpha in alphas:
                if alpha is None:
                    masks.append(torch.ones(1, 1, *size))
                else:  # kohya: the mask is area-resized to the loss (latent) size
                    masks.append(torch.nn.functional.interpolate(
                        alpha[None, None].float(), size=tuple(size), mode="area"))
            weight = weight * torch.cat(masks)
        return weight

    def validation_batches(self) -> list[Batch]:
        """One fixed batch per held-out image (or validation folder image): not flipped, its
        caption without shuffling or drop-out (prefix, suffix and wildcards, drawn once)."""
        out = []
        for number, dataset in enumerate(self.datasets + self.validation):
            for position, entry in enumerate(dataset.validation_images):
                subset = dataset.config.subsets[entry.subset]
                fixed = dataclasses.replace(subset, shuffle_caption=False, caption_dropout_rate=0.0,
                                            caption_dropout_every_n_epochs=0,
                                            caption_tag_dropout_rate=0.0)
                text = process_caption(fixed, entry.caption,
                                       seeds.rng(self.seed, "validation caption", number, position))
                latent, alpha = _load_latents(entry, False)
                latent = (latent - self.shift_factor if self.shift_factor else latent)
                latent = (latent * self.scaling_factor)[None]
                out.append(Batch(latents=latent, texts=[text],
                                 weights=self._weights([1.0], [alpha], latent.shape[-2:]),
                                 sizes=[_size_info(entry)]))
        return out

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)


def prepare_datasets(configs: DatasetConfig | Iterable[DatasetConfig], vae, seed: int = 0,
                     cache_to_disk: bool = False, vae_batch_size: int = 1,
                     prior_loss_weight: float = 1.0,
                     report: Callable[[str], None] = lambda text: None,
                     validation: DatasetConfig | None = None) -> KohyaBatches:
    """Scan, bucket and cache latents of one or more datasets; return their batch source.
    `validation`: a dataset whose every image is a validation image (validation_data_dir)."""
    configs = [configs] if isinstance(configs, DatasetConfig) else list(configs)
    datasets = [scan_dataset(config, seed) for config in configs]
    held = [validation_dataset(validation)] if validation is not None else []
    for dataset in datasets + held:
        cache_latents(dataset, vae, seed, cache_to_disk, vae_batch_size, report)
    return KohyaBatches(datasets, seed, vae.config.scaling_factor, prior_loss_weight,
                        getattr(vae.config, "shift_factor", None) or 0.0, validation=held)


def validation_dataset(config: DatasetConfig) -> KohyaDataset:
    """A validation folder's dataset: every image is held out (none trains)."""
    try:
        dataset = scan_dataset(config)
    except DatasetError as error:
        raise DatasetError(str(error).replace("image_dir:", "validation_data_dir:", 1)) from None
    dataset.validation_images, dataset.train_images = dataset.train_images, []
    return dataset


# ----------------------------------------------------------------------------- metadata

def _as_list(datasets) -> list[KohyaDataset]:
    if isinstance(datasets, KohyaBatches):
        return datasets.datasets
    return [datasets] if isinstance(datasets, KohyaDataset) else list(datasets)


def tag_frequency(datasets) -> dict[str, dict[str, int]]:
    """{folder name: {tag: count}} over the raw captions (kohya's ss_tag_frequency): tags are
    comma-separated, stripped and lower-cased; a folder used by several datasets counts once."""
    merged: dict[str, dict[str, int]] = {}
    for dataset in _as_list(datasets):
        own: dict[str, dict[str, int]] = {}
        for index, subset in enumerate(dataset.config.subsets):
            counts = own.setdefault(subset.image_dir.name, {})
            for entry in dataset.train_images + dataset.reg_images:
                if entry.subset != index:
                    continue
                for tag in entry.caption.split(","):
                    tag = tag.strip().lower()
                    if tag:
                        counts[tag] = counts.get(tag, 0) + 1
        for name, counts in own.items():
            merged.setdefault(name, counts)
    return merged


def dataset_dirs_info(datasets, is_reg: bool = False) -> dict[str, dict[str, int]]:
    """{folder name: {"n_repeats", "img_count"}} of the training (or regularization) subsets,
    as kohya's ss_dataset_dirs / ss_reg_dataset_dirs; repeated names get " (2)", " (3)"..."""
    info: dict[str, dict[str, int]] = {}
    for dataset in _as_list(datasets):
        for subset, count in zip(dataset.config.subsets, dataset.img_counts):
            if subset.is_reg != is_reg:
                continue
            name, number = subset.image_dir.name, 2
            while name in info:
                name, number = f"{subset.image_dir.name} ({number})", number + 1
            info[name] = {"n_repeats": subset.num_repeats, "img_count": count}
    return info


def bucket_info(dataset: KohyaDataset) -> dict:
    """kohya's ss_bucket_info: images (with repeats) per bucket and the mean aspect error."""
    counts: dict[tuple[int, int], int] = {}
    for entry in dataset.entries:
        counts[entry.placement.bucket] = counts.get(entry.placement.bucket, 0) + entry.repeats
    buckets = {i: {"resolution": list(reso), "count": counts[reso]}
               for i, reso in enumerate(sorted(counts))}
    errors = [abs(e.placement.ar_error) for e in dataset.entries]
    return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}


def describe(dataset: KohyaDataset) -> str:
    lines = [f"{dataset.num_train_images} training images with repeats, "
             f"{dataset.num_reg_images} regularization images with repeats"]
    for subset, count in zip(dataset.config.subsets, dataset.img_counts):
        kind = "reg" if subset.is_reg else "train"
        lines.append(f"  [{kind}] {subset.image_dir.name}: {count} images x {subset.num_repeats}")
    for number, item in bucket_info(dataset)["buckets"].items():
        lines.append(f"  bucket {number}: {item['resolution'][0]}x{item['resolution'][1]}, "
                     f"{item['count']} images")
    return "\n".join(lines + [f"  note: {n}" for n in dataset.notes])
