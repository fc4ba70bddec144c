"""Checks on files and folders a config names, run before a job is queued (torch-free)."""
from __future__ import annotations

from core.config import ConfigError, path_problems
from core.images import IMAGE_EXTENSIONS, list_images
from core.paths import Paths, PathError
from trainers.captions import list_templates
from trainers.embeddings import find_embedding
from trainers.hypernetworks import find_hypernetwork


def check_dataset(paths: Paths, typed: str, field: str = "data_root") -> list[str]:
    try:
        folder = paths.resolve(typed, field)
    except PathError as error:
        return [str(error)]
    if not folder.exists():
        return [f"{field}: {folder} does not exist"]
    if not folder.is_dir():
        return [f"{field}: {folder} is not a folder"]
    if count_images(folder) == 0:
        return [f"{field}: {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})"]
    return []


def count_images(folder) -> int:
    """The images a run will try to load from a folder (the loaders' own list)."""
    return len(list_images(folder))


def check_before_queueing(cfg, paths: Paths) -> None:
    """Problems a config's named files and folders have, raised as one ConfigError."""
    problems = path_problems(cfg, paths)  # every field that names a file or folder
    if hasattr(cfg, "data_root"):  # A1111-style methods
        problems += check_dataset(paths, cfg.data_root)
    if hasattr(cfg, "template") and cfg.template not in list_templates(paths.templates):
        problems.append(f"template: {cfg.template!r} is not in {paths.templates}")
    if hasattr(cfg, "log_directory"):
        try:
            paths.resolve(cfg.log_directory, "log_directory")
        except PathError as error:
            problems.append(str(error))
    embedding = getattr(cfg, "embedding", None)
    if embedding and not getattr(cfg, "create_missing", False) \
            and find_embedding(paths, embedding.strip()) is None:
        problems.append(f"embedding: no embedding named {embedding!r} in {paths.embeddings}; "
                        "create it first (Create embedding, or create_missing = true)")
    hypernetwork = getattr(cfg, "hypernetwork", None)
    if hypernetwork and find_hypernetwork(paths, hypernetwork.strip()) is None:
        problems.append(f"hypernetwork: no hypernetwork named {hypernetwork!r} in {paths.hypernetworks}")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    if hasattr(cfg, "in_json"):  # native fine-tuning: images and captions from a JSON
        from trainers.methods.fine_tune import check_dataset as check_fine_tune
        check_fine_tune(cfg, paths)
        return
    if hasattr(cfg, "train_data_dir"):
        from trainers.kohya_training import check_paths, dataset_configs
        check_paths(cfg, paths)
        try:
            dataset_configs(cfg, paths)  # folder names, TOML keys and bucket settings
        except ConfigError:
            raise
        except (PathError, ValueError) as error:  # e.g. a TOML naming a folder outside
            raise ConfigError(str(error)) from None


check_template_training = check_before_queueing
