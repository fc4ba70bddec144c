"""Aesthetic embeddings on disk, torch-free (for the page's dropdown)."""
from __future__ import annotations


def list_aesthetic_embeddings(paths) -> list[str]:
    folder = paths.aesthetic_embeddings
    return sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []
