"""Aesthetic embeddings on disk, torch-free (for the page's dropdown and the preview's lookup)."""
from __future__ import annotations

from pathlib import Path

from core.paths import PathError

SUFFIX = ".pt"


def list_aesthetic_embeddings(paths) -> list[str]:
    folder = paths.aesthetic_embeddings
    return sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []


def find_aesthetic_embedding(paths, typed: str, field: str = "aesthetic_embedding") -> Path:
    """The file a dropdown name (`look` -> models/aesthetic_embeddings/look.pt) or a typed path
    names. Every candidate goes through `paths.resolve`, so a shared app refuses one outside the
    data folder (PathError naming the field) before anything is looked at; FileNotFoundError
    when nothing is there."""
    text = str(typed).strip()
    if not text:
        raise PathError(f"{field}: choose an aesthetic embedding")
    typed_path = paths.resolve(text, field)  # as typed, from the data folder
    folder = paths.aesthetic_embeddings
    candidates = [paths.resolve(folder / f"{text}{SUFFIX}", field)]
    if text.lower().endswith(SUFFIX):
        candidates += [paths.resolve(folder / text, field), typed_path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    wanted = text if text.lower().endswith(SUFFIX) else f"{text}{SUFFIX}"
    raise FileNotFoundError(f"{field}: no {Path(wanted).name} in {folder}")
