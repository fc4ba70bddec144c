"""Checks on files and folders a config names, run before a job is queued (torch-free)."""
from __future__ import annotations

from core.config import ConfigError
from core.paths import Paths, PathError
from trainers.captions import list_templates
from trainers.embeddings import find_embedding

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"}


def check_dataset(paths: Paths, typed: str, field: str = "data_root") -> list[str]:
    try:
        folder = paths.resolve(typed, field)
    except PathError as error:
        return [str(error)]
    if not folder.exists():
        return [f"{field}: {folder} does not exist"]
    if not folder.is_dir():
        return [f"{field}: {folder} is not a folder"]
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()):
        return [f"{field}: {folder} contains no images"]
    return []


def check_template_training(cfg, paths: Paths) -> None:
    problems = check_dataset(paths, cfg.data_root)
    if cfg.template not in list_templates(paths.templates):
        problems.append(f"template: {cfg.template!r} is not in {paths.templates}")
    try:
        paths.resolve(cfg.log_directory, "log_directory")
    except PathError as error:
        problems.append(str(error))
    embedding = getattr(cfg, "embedding", None)
    if embedding and find_embedding(paths, embedding.strip()) is None:
        problems.append(f"embedding: no embedding named {embedding!r} in {paths.embeddings}")
    if problems:
        raise ConfigError(problems)
