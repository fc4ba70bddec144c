"""A base model's tokenizers and token-embedding tables, read without building its pipeline.

Create embedding needs, per text encoder, only the tokenizer and the [vocab, width] token
embedding table, but it runs in the app process, where a whole pipeline (GBs for SD1.5, far
more for SDXL) would sit beside the training worker's own copy. So the table is read alone with
safetensors' safe_open from a diffusers folder (`text_encoder/model.safetensors`) or an
original-layout single file (by its key per family), and the tokenizers come from the folder or
the file's config skeleton. What cannot be read that way (a .ckpt, .bin-only weights, a hub id,
a missing key) goes through load_model as before; a model already loaded here is used as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.paths import Paths

# transformers 4 and the hub's models keep CLIP's `text_model.` level; transformers 5 saves
# CLIPTextModel without it (CLIPTextModelWithProjection still with it)
FOLDER_KEYS = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")
ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


@dataclass
class TextTables:
    """Per text encoder (SDXL: two) its tokenizer and token-embedding table; the model's name
    and A1111 short hash (single files only, as load_model gives it)."""
    name: str
    short_hash: str | None
    tokenizers: list[Any]
    tables: list[Any]  # torch tensors [vocab, width]
    halves: tuple[str, ...] = ()  # its family's embedding_halves: an embedding's parts


class _NotLight(Exception):
    """The tables cannot be read alone; the model is loaded instead."""


def text_tables(paths: Paths, name: str) -> TextTables:
    """The tokenizers and tables of the base model a model dropdown names (ModelError, naming
    `model:`, for a name that is not a model)."""
    from trainers import models
    from trainers.families import FamilyError, file_family, folder_family
    from trainers.families import demo_families, get
    from trainers.tiny_model import build_tiny_model

    loaded = models.cached_model(paths, name)
    if loaded is not None:
        return _of_model(loaded)
    kind, location = models.resolve_model(paths, name)
    why = ""  # what the light reader missed, for the error when loading fails too
    try:
        if kind == "demo":
            family = demo_families()[name.strip()]
            return _from_folder(name, build_tiny_model(Path(location), family=family), family)
        if kind == "folder":
            return _from_folder(name, Path(location), folder_family(location))
        if kind == "file" and Path(location).suffix.lower() == ".safetensors" \
                and get(file_family(location)).single_file:
            path = Path(location)
            family = file_family(path)
            tables = [_read(path, key) for key in get(family).token_embedding_keys]
            config = models.single_file_config(paths, path, family)
            return TextTables(name, models.file_short_hash(path, paths.cache),
                              _tokenizers(config, len(tables)), tables,
                              get(family).embedding_halves)
    except FamilyError as error:
        raise models.ModelError(str(error)) from error
    except _NotLight as missing:
        why = str(missing)
    try:
        return _of_model(models.load_model(paths, name))
    except Exception as error:
        if not why:
            raise
        if isinstance(error, models.ModelError):
            raise models.ModelError(f"{error} ({why})") from error
        raise models.ModelError(f"model: could not load {name!r} ({why}): "
                                f"{type(error).__name__}: {error}") from error


def _of_model(model) -> TextTables:
    tables = [encoder.get_input_embeddings().weight.detach() for encoder in model.text_encoders]
    return TextTables(model.name, model.short_hash, model.tokenizers, tables,
                      model.spec.embedding_halves)


def _from_folder(name: str, folder: Path, family: str) -> TextTables:
    from trainers.families import get
    count = len(get(family).tokenizer_pads)
    tables = [_folder_table(folder / encoder) for _, encoder in ENCODERS[:count]]
    return TextTables(name, None, _tokenizers(folder, count), tables,
                      get(family).embedding_halves)


def _tokenizers(folder: Path, count: int) -> list:
    import transformers
    from transformers import CLIPTokenizer
    transformers.utils.logging.set_verbosity_error()  # as load_model does; diffusers stays unloaded
    found = []
    for tokenizer, _ in ENCODERS[:count]:
        if not (folder / tokenizer / "vocab.json").is_file():
            raise _NotLight(f"no {tokenizer}/vocab.json in {folder}")
        found.append(CLIPTokenizer.from_pretrained(folder / tokenizer, local_files_only=True))
    return found


def _folder_table(encoder: Path):
    """The table from `model.safetensors`, or from the shard a sharded folder's index names."""
    single = encoder / "model.safetensors"
    if single.is_file():
        return _read(single, *FOLDER_KEYS)
    index = encoder / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise _NotLight(f"no model.safetensors in {encoder}") from None
    for key in FOLDER_KEYS:
        if key in weight_map:
            return _read(encoder / weight_map[key], key)
    raise _NotLight(f"{index} names no {FOLDER_KEYS[0]}")


def _read(path: Path, *keys: str):
    """The first of `keys` the file holds, read alone (the rest of the file is not touched)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            for key in keys:
                if key in names:
                    return handle.get_tensor(key)
    except Exception as error:  # unreadable here: load_model reads it (or says what is wrong)
        raise _NotLight(f"{path.name}: {type(error).__name__}: {error}") from None
    raise _NotLight(f"{path.name} has no {' or '.join(keys)}")
