"""Captioners: a small registry of image -> caption models, each loaded lazily and only once.

    blip       BLIP through transformers      models/BLIP/ (save_pretrained folder) or a hub id
    deepbooru  DeepDanbooru ResNet (PyTorch)  models/deepbooru/model-resnet_custom_v3.pt
    wd14       SmilingWolf WD taggers v2 / v3 (ONNX)  models/wd14/<name>/{model.onnx,selected_tags.csv}
    vlm        Florence-2, Qwen2.5-VL, Qwen3-VL, LLaVA / JoyCaption through transformers
               models/vlm/<name>/ (the model repository's files)

`create(name, cfg, paths)` returns an object with `caption(image) -> str`; its model is loaded on
first use of that location and kept in `_MODELS` for later runs until `unload_all()`. Nothing
here imports torch, transformers or onnxruntime until a captioner is created."""
from __future__ import annotations

import importlib
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Protocol

# name -> (module under preprocess.captioners, label)
_REGISTRY: dict[str, tuple[str, str]] = {
    "blip": ("blip", "BLIP caption"),
    "deepbooru": ("deepbooru", "DeepDanbooru tags"),
    "wd14": ("wd14", "WD tagger tags"),
    "vlm": ("vlm", "VLM caption"),
}
# Captioners whose output is a tag list; the others write natural-language captions
TAGGERS = {"deepbooru", "wd14"}
_MODELS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


class Captioner(Protocol):
    """May also have `caption_batch(images) -> list[str]` and `batch_size` (the pipeline then
    gathers that many images), and `should_stop` (set to the job's stop check)."""
    name: str

    def caption(self, image) -> str: ...


class Stopped(Exception):
    """A stop request ended a captioner in the middle of a batch; that batch has no captions."""


class CaptionerError(RuntimeError):
    """A captioner's model cannot be found or loaded; the message says where to put it."""

    @property
    def user_message(self) -> str:
        return str(self)


def names() -> list[str]:
    return list(_REGISTRY)


def label(name: str) -> str:
    return _REGISTRY[name][1]


def is_tagger(name: str) -> bool:
    return name in TAGGERS


def register(name: str, module: str, label: str, tagger: bool = False) -> None:
    """Add a captioner: `module` (importable) must define create(cfg, paths, device)."""
    _REGISTRY[name] = (module, label)
    if tagger:
        TAGGERS.add(name)


def create(name: str, cfg, paths, device: str | None = None) -> Captioner:
    if name not in _REGISTRY:
        raise CaptionerError(f"captioners: unknown captioner {name!r} (known: {', '.join(names())})")
    module_name = _REGISTRY[name][0]
    if "." not in module_name:
        module_name = f"{__name__}.{module_name}"
    module = importlib.import_module(module_name)
    return module.create(cfg, paths, resolve_device(device or getattr(cfg, "device", "auto")))


def cached(key: tuple, load: Callable[[], Any]) -> Any:
    """Load a model once per key (kind, location, device) and keep it."""
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load()
        return _MODELS[key]


def unload_all() -> None:
    with _LOCK:
        _MODELS.clear()


def loaded() -> list[tuple]:
    with _LOCK:
        return list(_MODELS)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubModel(str):
    """A hub id returned by find_model, remembering the local places that were tried."""
    looked: tuple = ()

    def not_found(self, field: str, error: Exception) -> CaptionerError:
        where = ", ".join(str(p) for p in self.looked)
        return CaptionerError(f"{field}: no local model in {where}, and {self} could not be "
                              f"loaded from the hub ({type(error).__name__}: {error})")


def find_model(paths, typed: str, *, field: str, subdir: str, is_model: Callable[[Path], bool],
               expects: str, hub_default: str | None = None) -> Path | str:
    """Find a model by what the user typed: a path (absolute, or relative to the data folder),
    a folder under models/<subdir>/ or models/, else a hub id (typed, or `hub_default` when the
    typed name was not found) if the hub is reachable. Returns a Path or a hub id string."""
    text = typed.strip()
    if not text:
        raise CaptionerError(f"{field}: no model given")
    looked: list[Path] = []
    if paths is not None:
        from core.paths import PathError
        try:
            looked.append(paths.resolve(text, field))
        except PathError as error:
            raise CaptionerError(str(error)) from None
        if not Path(text).expanduser().is_absolute():
            looked += [paths.models / subdir / text, paths.models / text]
    else:
        looked.append(Path(text).expanduser())
    unique = list(dict.fromkeys(looked))
    for candidate in unique:
        if candidate.exists() and is_model(candidate):
            return candidate
    if not offline():
        hub = text if _HUB_ID.match(text) and not Path(text).exists() else hub_default
        if hub:
            found = HubModel(hub)
            found.looked = tuple(unique)
            return found
    where = ", ".join(str(p) for p in unique)
    hint = f" (or go online to use the hub id {hub_default})" if hub_default else ""
    raise CaptionerError(f"{field}: no model found for {text!r}; looked in {where}. "
                         f"Expected {expects}{hint}.")


# --- tag formatting shared by the taggers -------------------------------------------------------

_SPECIAL = re.compile(r"([\\()])")


def normalise_tag(tag: str) -> str:
    """The form used to compare user-typed tags with model tags: lower case, spaces as
    underscores."""
    return tag.strip().lower().replace(" ", "_")


def parse_tag_list(text: str) -> set[str]:
    return {normalise_tag(t) for t in text.split(",") if t.strip()}


# Emoticon tags whose underscore is part of the face (the WD tagger space's list)
KAOMOJI = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<",
                     "3_3", "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})


def is_kaomoji(tag: str) -> bool:
    """Kept with its underscores: the known emoticons, and (as kohya does) any tag of 3
    characters or less."""
    return tag in KAOMOJI or len(tag) <= 3


def format_tags(scores: dict[str, float], threshold: float | Callable[[str], float] = 0.5,
                sort_alpha: bool = True, use_spaces: bool = True, escape: bool = True,
                exclude: set[str] | frozenset = frozenset(), drop_rating: bool = True,
                keep_kaomoji: bool = False) -> list[str]:
    """Tags scoring at least the threshold, without `rating:*` tags and excluded ones, sorted
    alphabetically (by the raw tag) or by descending score, then underscores -> spaces and
    brackets and backslashes escaped with a backslash, as A1111 does for DeepDanbooru.
    `keep_kaomoji` leaves emoticons like ^_^ alone (is_kaomoji)."""
    limit = threshold if callable(threshold) else (lambda _tag, t=threshold: t)
    kept = {tag: p for tag, p in scores.items()
            if p >= limit(tag) and not (drop_rating and tag.startswith("rating:"))
            and normalise_tag(tag) not in exclude}
    if sort_alpha:
        ordered = sorted(kept)
    else:
        ordered = [tag for tag, _ in sorted(kept.items(), key=lambda item: -item[1])]
    out = []
    for tag in ordered:
        text = tag
        if use_spaces and not (keep_kaomoji and is_kaomoji(tag)):
            text = text.replace("_", " ")
        if escape:
            text = _SPECIAL.sub(r"\\\1", text)
        out.append(text)
    return out
