"""The models/hypernetworks folder: list and find hypernetwork files."""
from __future__ import annotations

from pathlib import Path

from core.paths import Paths


def list_hypernetworks(paths: Paths) -> list[str]:
    folder = paths.hypernetworks
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.rglob("*.pt")}, key=str.lower)


def find_hypernetwork(paths: Paths, name: str) -> Path | None:
    direct = paths.hypernetworks / f"{name}.pt"
    if direct.is_file():
        return direct
    matches = sorted(p for p in paths.hypernetworks.rglob("*.pt") if p.stem == name) \
        if paths.hypernetworks.is_dir() else []
    return matches[0] if matches else None
