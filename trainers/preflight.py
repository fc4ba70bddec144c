"""Checks on files and folders a config names, run before a job is queued (torch-free)."""
from __future__ import annotations

from core.config import ConfigError
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
    """Problems a config's named files and folders have, raised as one ConfigError (each config
    owns its checks: `check_files`, trainers/configs.py), and a model of a family the method
    does not train (told from the model's configs or file header, without loading it)."""
    from trainers import catalog
    from trainers.families import guess_family
    method = catalog.for_config(type(cfg))
    model = getattr(cfg, "model", "")
    family = guess_family(paths, model) if method and isinstance(model, str) else None
    problem = family and catalog.family_problem(method, family, model)
    if problem:
        raise ConfigError([problem])
    if family and hasattr(cfg, "family_problems"):
        from trainers import families
        problems = cfg.family_problems(families.get(family))
        if problems:
            raise ConfigError(problems)
        if problems := getattr(cfg, "adapter_family_problems", lambda _: [])(families.get(family)):
            raise ConfigError(problems)
    cfg.check_files(paths)


def log_directory_problems(cfg, paths: Paths) -> list[str]:
    try:
        paths.resolve(cfg.log_directory, "log_directory")
    except PathError as error:
        return [str(error)]
    return []


def template_problems(cfg, paths: Paths) -> list[str]:
    """A1111-style methods: the dataset folder, the prompt template, the log folder."""
    problems = check_dataset(paths, cfg.data_root)
    if cfg.template not in list_templates(paths.templates):
        problems.append(f"template: {cfg.template!r} is not in {paths.templates}")
    return problems + log_directory_problems(cfg, paths)


def embedding_problems(paths: Paths, name: str, may_create: bool = False) -> list[str]:
    if not name or may_create or find_embedding(paths, name.strip()) is not None:
        return []
    return [f"embedding: no embedding named {name!r} in {paths.embeddings}; "
            "create it first (Create embedding, or create_missing = true)"]


def hypernetwork_problems(paths: Paths, name: str) -> list[str]:
    if not name or find_hypernetwork(paths, name.strip()) is not None:
        return []
    return [f"hypernetwork: no hypernetwork named {name!r} in {paths.hypernetworks}"]


def check_kohya_dataset(cfg, paths: Paths) -> None:
    """kohya-style methods: the folders exist and their names, TOML keys and buckets parse."""
    from trainers.kohya_training import check_paths, dataset_configs
    check_paths(cfg, paths)
    try:
        dataset_configs(cfg, paths)  # folder names, TOML keys and bucket settings
    except ConfigError:
        raise
    except (PathError, ValueError) as error:  # e.g. a TOML naming a folder outside
        raise ConfigError(str(error)) from None


check_template_training = check_before_queueing
